"""What RQ's Redis says about workers and queues, read without changing anything.

Registry counts are ZCARDs (RQ's ``count`` would first run its clean-up, which moves jobs
and fires failure callbacks); workers are read from their hashes. Evidence, never truth.
"""

import socket
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil
import redis
from django.conf import settings
from rq.defaults import DEFAULT_WORKER_TTL
from rq.job import Job
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.utils import utcformat, utcparse
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS

from diagnostics import health

REGISTRIES = {
    "started": StartedJobRegistry,
    "failed": FailedJobRegistry,
    "finished": FinishedJobRegistry,
    "deferred": DeferredJobRegistry,
    "scheduled": ScheduledJobRegistry,
    "canceled": CanceledJobRegistry,
}
WORKER_KEY_PREFIX = Worker.redis_worker_namespace_prefix
QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix

# One pass over RQ's workers inside Redis, for the watchdog, /metrics and the system page
# (one round trip; a hash leaves Redis only when it matters): the keys of the workers whose
# key is gone, that shut down, or whose last heartbeat is older than ARGV[1] (RQ writes
# UTC text that sorts as time does), and of the others on this host (ARGV[2]: their
# processes can be looked at); the Keel job each busy worker runs (names without ARGV[4],
# RQ's key prefix, and jobs in one newline-separated text: parsed at once); up to ARGV[3] keys of
# the rest (for a page to show); how many of the others listen to each queue; how many
# workers RQ lists. At 10 000 workers: a short pair per busy worker and a few keys.
WORKER_SWEEP = """
local unwell, nearby, busy, well, order, sample = {}, {}, {}, {}, {}, {}
local members = redis.call('SMEMBERS', KEYS[1])
for _, key in ipairs(members) do
  local f = redis.call('HMGET', key, 'last_heartbeat', 'death', 'current_job', 'queues',
                       'hostname')
  if not f[1] or f[2] or f[1] < ARGV[1] then
    unwell[#unwell + 1] = key
  elseif f[5] == ARGV[2] then
    nearby[#nearby + 1] = key
  elseif #sample < tonumber(ARGV[3]) then
    sample[#sample + 1] = key
  else
    for queue in string.gmatch(f[4] or '', '[^,]+') do
      if not well[queue] then well[queue] = 0; order[#order + 1] = queue end
      well[queue] = well[queue] + 1
    end
  end
  if f[3] and string.sub(f[3], 1, 5) == 'keel-' then
    busy[#busy + 1] = string.sub(key, #ARGV[4] + 1)
    busy[#busy + 1] = f[3]
  end
end
local counts = {}
for _, queue in ipairs(order) do
  counts[#counts + 1] = queue
  counts[#counts + 1] = well[queue]
end
return {unwell, nearby, table.concat(busy, '\\n'), counts, sample, #members}
"""


@dataclass
class WorkerSweep:
    """What one pass over RQ's workers found (``WORKER_SWEEP``)."""

    unwell: list[str]  # names: key gone, shut down, or quiet for the stale threshold
    nearby: list[str]  # names: the others on this host
    busy: dict[str, str]  # name: the Keel job it runs
    sample: list[str]  # names: the first ``sample`` of the rest (for a page to show)
    well_by_queue: dict[str, int]  # queue: how many of the rest after those listen to it
    registered: int  # how many workers RQ lists


def sweep_workers(
    client: redis.Redis, *, quiet_before: datetime, host: str, sample: int = 0
) -> WorkerSweep:
    """Every worker RQ lists, looked at inside Redis (``WORKER_SWEEP``): those to read in
    full by name, what each busy one runs, how many of the rest listen to each queue, and
    up to ``sample`` of the rest by name (not counted in ``well_by_queue``)."""

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    unwell, nearby, busy, well, some, registered = client.eval(
        WORKER_SWEEP,
        1,
        REDIS_WORKER_KEYS,
        utcformat(quiet_before),
        host,
        sample,
        WORKER_KEY_PREFIX,
    )
    prefix = len(WORKER_KEY_PREFIX)
    pairs = text(busy).split("\n") if busy else []
    return WorkerSweep(
        unwell=[text(key)[prefix:] for key in unwell],
        nearby=[text(key)[prefix:] for key in nearby],
        busy=dict(zip(pairs[::2], pairs[1::2], strict=True)),
        well_by_queue={text(well[i]): int(well[i + 1]) for i in range(0, len(well), 2)},
        sample=[text(key)[prefix:] for key in some],
        registered=int(registered),
    )


def _rq_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        return utcparse(raw).replace(tzinfo=UTC)
    except ValueError:
        return None


def worker_is_alive(fields: dict, now: datetime) -> bool:
    """Whether the worker behind an RQ worker hash still runs.

    RQ keeps a killed worker's hash until its TTL runs out (worker_ttl + 60 s, eight
    minutes by default), and an idle worker renews it only every ~405 s, so the hash
    alone says little. When the worker runs on this host its pid settles the question at
    once; elsewhere we go by RQ's heartbeat. (A worker in another pid namespace with this
    host's name would look dead here: give containers their own host names.)
    """
    if fields.get("death"):
        return False
    heartbeat = _rq_time(fields.get("last_heartbeat"))
    if heartbeat and (now - heartbeat).total_seconds() > DEFAULT_WORKER_TTL + 60:
        return False
    pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
    if pid and fields.get("hostname") == socket.gethostname():
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True
    return True


def read_workers(client: redis.Redis, names: list[str] | None = None) -> list[dict]:
    """Every worker RQ has registered (or those named): what it does, its counts, whether
    it is alive.

    Reads the hashes directly rather than through ``rq.Worker.all``: building Worker
    objects raises the client's socket timeout to ~7 minutes (RQ sizes it for BLPOP),
    which would turn a probe of a hung Redis into a hung probe. Raises redis.RedisError.
    """
    if names is None:
        keys = sorted(key.decode() for key in client.smembers(REDIS_WORKER_KEYS))
    else:
        keys = sorted(WORKER_KEY_PREFIX + name for name in set(names))
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        hashes = pipe.execute()
    now = datetime.now(UTC)
    workers = []
    for key, raw in zip(keys, hashes, strict=True):
        if not raw:
            continue  # registered but expired: RQ forgets it at its next clean-up
        fields = {name.decode(): value.decode(errors="replace") for name, value in raw.items()}
        workers.append(
            {
                "name": key.removeprefix(WORKER_KEY_PREFIX),
                "hostname": fields.get("hostname", ""),
                "pid": int(fields["pid"]) if fields.get("pid", "").isdigit() else None,
                "state": fields.get("state", "?"),
                "queues": [name for name in fields.get("queues", "").split(",") if name],
                "current_job": fields.get("current_job", ""),
                "last_heartbeat": _rq_time(fields.get("last_heartbeat")),
                "birth": _rq_time(fields.get("birth")),
                "successful_jobs": int(fields.get("successful_job_count") or 0),
                "failed_jobs": int(fields.get("failed_job_count") or 0),
                "working_seconds": round(float(fields.get("total_working_time") or 0), 3),
                "alive": worker_is_alive(fields, now),
                "unresponsive": worker_is_unresponsive(fields, now),
            }
        )
    return workers


def worker_is_unresponsive(fields: dict, now: datetime) -> bool:
    """Whether a worker that RQ still lists has stopped beating: a Keel worker heartbeats
    at least every KEEL_HEARTBEAT_SECONDS, so a stale beat is a frozen process (the
    ``worker_unresponsive`` finding says more), not a worker that takes work."""
    if fields.get("death"):
        return False
    heartbeat = _rq_time(fields.get("last_heartbeat"))
    stale_after = settings.KEEL_STALE_BEATS * settings.KEEL_HEARTBEAT_SECONDS
    return heartbeat is not None and (now - heartbeat).total_seconds() > stale_after


def queue_names(client: redis.Redis) -> list[str]:
    """Keel's queues first, in priority order, then any other queue RQ knows of."""
    known = sorted(
        key.decode().removeprefix(QUEUE_KEY_PREFIX)
        for key in client.smembers(Queue.redis_queues_keys)
    )
    return list(settings.KEEL_QUEUES) + [name for name in known if name not in settings.KEEL_QUEUES]


def read_queues(
    client: redis.Redis,
    workers: list[dict],
    names: list[str] | None = None,
    *,
    live_elsewhere: dict[str, int] | None = None,
) -> list[dict]:
    """Length, oldest job's age, listening workers and registry sizes of each queue.
    ``workers`` are those read in full; ``live_elsewhere`` counts, per queue, the live
    workers a sweep counted without reading them (``live`` is the total).

    Two round trips whatever the number of queues. Raises redis.RedisError.
    """
    names = names if names is not None else queue_names(client)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(QUEUE_KEY_PREFIX + name)
            pipe.lindex(QUEUE_KEY_PREFIX + name, 0)  # RQ pushes right, pops left: the oldest
            for registry in REGISTRIES.values():
                pipe.zcard(registry.key_template.format(name))
        answers = pipe.execute()
    width = 2 + len(REGISTRIES)
    heads = [answers[index * width + 1] for index in range(len(names))]
    with client.pipeline(transaction=False) as pipe:
        for head in filter(None, heads):
            pipe.hget(Job.key_for(head.decode()), "enqueued_at")
        answered = iter(pipe.execute())
    enqueued = [next(answered) if head else None for head in heads]
    listening = health.live_workers_by_queue(workers, names)
    registered = {name: [] for name in names}
    for worker in workers:
        for queue in worker["queues"]:
            registered.setdefault(queue, []).append(worker["name"])
    now = datetime.now(UTC)
    queues = []
    for index, name in enumerate(names):
        row = answers[index * width : (index + 1) * width]
        oldest = _rq_time(enqueued[index].decode()) if enqueued[index] else None
        queues.append(
            {
                "name": name,
                "keel": name in settings.KEEL_QUEUES,
                "length": row[0],
                "oldest_job_id": heads[index].decode() if heads[index] else "",
                "oldest_enqueued_at": oldest,
                "oldest_age_seconds": round((now - oldest).total_seconds(), 1) if oldest else None,
                "workers": listening.get(name, []),
                "live": len(listening.get(name, [])) + (live_elsewhere or {}).get(name, 0),
                "dead_workers": sorted(
                    set(registered.get(name, [])) - set(listening.get(name, []))
                ),
                "registries": dict(zip(REGISTRIES, row[2:], strict=True)),
            }
        )
    return queues
