"""What RQ's Redis says about workers and queues, read without changing anything.

Registry counts are ZCARDs (RQ's ``count`` would first run its clean-up, which moves jobs
and fires failure callbacks); workers are read from their hashes. Evidence, never truth.
"""

import socket
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
from rq.utils import utcparse
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


def read_workers(client: redis.Redis) -> list[dict]:
    """Every worker RQ has registered: what it does, its counts, whether it is alive.

    Reads the hashes directly rather than through ``rq.Worker.all``: building Worker
    objects raises the client's socket timeout to ~7 minutes (RQ sizes it for BLPOP),
    which would turn a probe of a hung Redis into a hung probe. Raises redis.RedisError.
    """
    keys = sorted(key.decode() for key in client.smembers(REDIS_WORKER_KEYS))
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
    client: redis.Redis, workers: list[dict], names: list[str] | None = None
) -> list[dict]:
    """Length, oldest job's age, listening workers and registry sizes of each queue.

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
                "dead_workers": sorted(
                    set(registered.get(name, [])) - set(listening.get(name, []))
                ),
                "registries": dict(zip(REGISTRIES, row[2:], strict=True)),
            }
        )
    return queues
