"""The evidence the detectors share: one ``Context`` per tick, loaded lazily and once.

It holds the suspect running attempts — those a detector's SQL condition says may be
wrong (one query; healthy running attempts are never loaded) — the queued counts per
queue, what RQ's worker keys say (one pipelined round trip), when the last database and
Redis outages ended and, per suspect, a ``Liveness`` verdict: is the process running it still there? RQ's
registries are evidence, never the truth (CONVENTIONS §11): an attempt counts as lost
only on strong evidence — its process is gone (same host), or its heartbeat went stale
*and* RQ no longer knows its worker, or RQ ended its job — and never while its process
is seen alive (same host) or its worker heartbeats to RQ and still runs its job.

Nothing can write a heartbeat while the database is down (nor an RQ heartbeat while
Redis is): a heartbeat's age is counted from the end of the last outage when that is
later, so an outage is never read as every worker going silent at once.
"""

import operator
import re
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache, cached_property, reduce
from types import SimpleNamespace

import psutil
import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count, DurationField, F, Func, Min, Q
from django.utils import timezone
from rq.utils import utcparse

from diagnostics.models import Finding
from diagnostics.rq_state import WorkerSweep, sweep_workers
from workflows.models import NodeAttempt, NodeRun
from workflows.runtime import dispatch

CRITICAL, WARNING, INFO = Finding.Severity.CRITICAL, Finding.Severity.WARNING, Finding.Severity.INFO
# RQ's key layout (rq 2.x).
WORKERS_KEY = "rq:workers"
WORKER_PREFIX = "rq:worker:"
QUEUE_PREFIX = "rq:queue:"
SUSPENDED_KEY = "rq:suspended"
# RQ job states in which RQ will never run the job again.
ENDED_JOB_STATES = {"finished", "failed", "stopped", "canceled"}
# The finding subjects that record an outage of each store (see stores.py, watchdog.py).
DB_OUTAGE = ("db_unhealthy", "database:unreachable")
REDIS_OUTAGE = ("redis_unhealthy", "redis:unreachable")
# What the watchdog reads of an RQ worker's hash.
WORKER_FIELDS = ("queues", "hostname", "pid", "state", "current_job", "last_heartbeat", "death")
# A Keel job id: keel-<node run id>-<attempt> (workflows/dispatch.job_id).
KEEL_JOB_ID = re.compile(r"^keel-(\d+)-(\d+)$")


def setting(name: str, default):
    return getattr(settings, name, default)


@dataclass
class WorkerInfo:
    """What RQ's worker keys say about one worker, checked against the process table."""

    name: str
    registered: bool  # listed in rq:workers
    exists: bool  # its key has not expired
    queues: list[str] = field(default_factory=list)
    hostname: str = ""
    pid: int | None = None
    state: str = ""
    current_job: str = ""
    last_heartbeat: str = ""
    died: str = ""  # set by a clean shutdown
    process: str = "unknown"  # alive / dead / unknown (another host)
    # Seconds since its last RQ heartbeat, counted from the end of the last outage when
    # that is later; None when it never sent one.
    heartbeat_age: float | None = None
    # Whether that age is past KEEL_STALE_BEATS heartbeats: frozen, or too busy to beat.
    unresponsive: bool = False
    # Seen well by the worker sweep (listed, not shut down, an RQ heartbeat within this
    # many seconds, busy) and not read in full: its host, pid and queues are not known.
    beat_within: float | None = None

    @property
    def alive(self) -> bool:
        return self.exists and not self.died and self.process != "dead"

    @property
    def responsive(self) -> bool:
        """Alive, and heartbeating to RQ: it takes work (Keel workers beat idle or busy)."""
        beats = self.beat_within is not None or self.heartbeat_age is not None
        return self.alive and beats and not self.unresponsive

    def gone_because(self) -> str:
        if not self.exists:
            return f"RQ has no key for worker {self.name} (it expired or was never written)"
        if self.died:
            return f"worker {self.name} shut down at {self.died}"
        if self.process == "dead":
            return (
                f"worker {self.name}'s process (pid {self.pid} on {self.hostname}) no longer exists"
            )
        return ""

    def as_evidence(self) -> dict:
        if self.beat_within is not None:
            return {
                "name": self.name,
                "in_rq_registry": self.registered,
                "state": self.state,
                "current_job": self.current_job,
                "rq_heartbeat_within_seconds": self.beat_within,
            }
        return {
            "name": self.name,
            "in_rq_registry": self.registered,
            "rq_key_exists": self.exists,
            "queues": self.queues,
            "host": self.hostname,
            "pid": self.pid,
            "state": self.state,
            "current_job": self.current_job,
            "rq_last_heartbeat": self.last_heartbeat,
            "process": self.process,
        }


@dataclass
class Liveness:
    """Is the process running an attempt still there? The evidence, and the verdict."""

    heartbeat_age: float
    never_beat: bool
    process: str  # alive / dead / unknown
    process_detail: str
    worker: WorkerInfo | None
    job_status: str | None  # RQ's status, "missing", or None when Redis did not answer
    lost_because: str = ""
    # Why its process is known to be alive ("" when that is not known).
    alive_because: str = ""
    # The heartbeat age starts at the end of this database outage (None: no outage since).
    counted_from_outage: datetime | None = None

    @property
    def lost(self) -> bool:
        return bool(self.lost_because)

    @property
    def worker_gone(self) -> bool:
        """Whether RQ's own record says the worker is gone (or Redis knows nothing of it)."""
        return self.worker is None or not self.worker.alive


PROCESS_WORDS = {
    psutil.STATUS_STOPPED: "stopped (SIGSTOP?)",
    psutil.STATUS_TRACING_STOP: "stopped by a debugger (traced)",
    psutil.STATUS_ZOMBIE: "zombie (it exited; its parent has not reaped it)",
    psutil.STATUS_DISK_SLEEP: "waiting on the disk (uninterruptible)",
    psutil.STATUS_DEAD: "dead",
}


def process_words(pid: int | None, host: str, this_host: str) -> str:
    """What the process table says of a pid on this host, in words."""
    if not pid:
        return "unknown: no pid recorded"
    if host != this_host:
        return f"unknown: another host ({host or '?'})"
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return f"gone: no process with pid {pid}"
    except psutil.Error as error:
        return f"unknown: {error}"
    return PROCESS_WORDS.get(status, status)


def process_created(pid: int | None) -> float | None:
    """When a pid on this host was created (to tell it from a later process with its pid)."""
    try:
        return psutil.Process(pid).create_time() if pid else None
    except psutil.Error:
        return None


def process_state(pid: int | None, since: datetime | None) -> tuple[str, str]:
    """("alive" | "dead", why) for a pid on this host that must predate ``since``."""
    if not pid:
        return "unknown", "no pid recorded"
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "dead", f"pid {pid} is a zombie (exited, not yet reaped)"
        if since is not None and process.create_time() > since.timestamp() + 1:
            return "dead", f"pid {pid} now belongs to a newer process (the old one exited)"
    except psutil.NoSuchProcess:
        return "dead", f"no process with pid {pid} exists"
    except psutil.Error as error:
        return "unknown", f"could not inspect pid {pid}: {error}"
    return "alive", f"pid {pid} is running"


# What the detectors read of a suspect, as plain values: at 10 000 suspects (a mass
# incident) model instances and the fields nobody reads were most of the cost of loading.
SUSPECT_NODE_FIELDS = (
    "run_id",
    "node_key",
    "node_type",
    "status",
    "attempt",
    "attempts_base",
    "max_attempts",
    "timeout_seconds",
    "expected_seconds",
    "stall_after_seconds",
    "heartbeat_at",
    "started_at",
    "progress",
    "progress_at",
)
SUSPECT_ATTEMPT_FIELDS = (
    "node_run_id",
    "number",
    "status",
    "rq_job_id",
    "queue",
    "worker",
    "pid",
    "host",
    "started_at",
    "resource_samples",
)


class Suspect(SimpleNamespace):
    """A running node's current attempt as the detectors read it: ``attempt.pk``,
    ``attempt.node_run.heartbeat_at``, ``attempt.node_run.run.workflow_id``… (the names of
    NodeAttempt, NodeRun and Run), plain values only."""


def _suspect(row: tuple) -> Suspect:
    pk, *values = row
    attempt = dict(zip(SUSPECT_ATTEMPT_FIELDS, values, strict=False))
    node = dict(zip(SUSPECT_NODE_FIELDS, values[len(SUSPECT_ATTEMPT_FIELDS) :], strict=False))
    run = SimpleNamespace(pk=node["run_id"], id=node["run_id"], workflow_id=values[-1])
    node_run = SimpleNamespace(
        pk=attempt["node_run_id"], id=attempt["node_run_id"], run=run, **node
    )
    return Suspect(pk=pk, id=pk, node_run=node_run, **attempt)


class Context:
    """One tick's view of the world: loaded lazily, once, and shared by the detectors."""

    def __init__(self, *, now=None, redis_connection=None, db=None):
        self.now = now or timezone.now()
        self.heartbeat = float(settings.KEEL_HEARTBEAT_SECONDS)
        self.redis = redis_connection if redis_connection is not None else _redis()
        self.db = db if db is not None else connection
        self.host = socket.gethostname()
        self._liveness: dict[int, Liveness] = {}
        self._sweep: Future | None = None
        self._workers: dict[str, WorkerInfo] = {}
        # The detectors' suspect conditions (run_all fills it before any detector runs).
        self.suspect_conditions: list[Q] = []
        # Called by run_all between detectors (the watchdog keeps its lock with it).
        self.between_steps = lambda: None
        # Findings a detector could not re-examine this tick: left open, not resolved.
        self.keep_open: set[tuple[str, str]] = set()

    # Redis --------------------------------------------------------------------------------

    @cached_property
    def redis_error(self) -> str:
        """Why Redis did not answer a PING, or "" when it did."""
        try:
            self.redis.ping()
        except redis.RedisError as error:
            return f"{type(error).__name__}: {error}"
        return ""

    @property
    def redis_ok(self) -> bool:
        return not self.redis_error

    def worker_infos(self, names) -> dict[str, WorkerInfo]:
        """What RQ's keys say of these workers (one pipelined round trip for those not
        read yet this tick)."""
        wanted = sorted({name for name in names if name})
        unread = [name for name in wanted if name not in self._workers]
        if unread:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.smismember(WORKERS_KEY, [WORKER_PREFIX + name for name in unread])
                for name in unread:
                    pipe.hmget(WORKER_PREFIX + name, WORKER_FIELDS)
                registered, *replies = pipe.execute()
            for name, listed, values in zip(unread, registered, replies, strict=True):
                raw = {f: v for f, v in zip(WORKER_FIELDS, values, strict=True) if v is not None}
                self._workers[name] = self._worker_info(name, bool(listed), raw)
        return {name: self._workers[name] for name in wanted}

    def _worker_info(self, name: str, registered: bool, raw: dict) -> WorkerInfo:
        data = {text(k): text(v) for k, v in raw.items()}
        info = WorkerInfo(
            name=name,
            registered=registered,
            exists=bool(data),
            queues=[q for q in data.get("queues", "").split(",") if q],
            hostname=data.get("hostname", ""),
            pid=int(data["pid"]) if data.get("pid", "").isdigit() else None,
            state=data.get("state", ""),
            current_job=data.get("current_job", ""),
            last_heartbeat=data.get("last_heartbeat", ""),
            died=data.get("death", ""),
        )
        if info.exists and info.hostname == self.host and info.pid:
            info.process, _ = process_state(info.pid, None)
        if info.last_heartbeat:
            try:
                beat = rq_time(info.last_heartbeat)
            except ValueError:
                beat = None
            if beat is not None:
                info.heartbeat_age = self.age(max(beat, self.rq_outage_end or beat))
                info.unresponsive = info.heartbeat_age > self.stale_after
        return info

    def start_worker_sweep(self) -> None:
        """Start the worker sweep in a thread: Redis runs it (~30 ms at 10 000 workers)
        while the detectors ask the database for their suspects."""
        if "worker_sweep" not in self.__dict__ and self._sweep is None and self.redis_ok:
            self._sweep = _SWEEPER.submit(self._sweep_workers)

    @cached_property
    def worker_sweep(self) -> WorkerSweep:
        """One pass over every worker RQ lists, inside Redis (rq_state.sweep_workers)."""
        if self._sweep is not None:
            return self._sweep.result()  # its Redis error, if any, is raised here
        return self._sweep_workers()

    def _sweep_workers(self) -> WorkerSweep:
        cutoff = self.now - timedelta(seconds=self.stale_after)
        return sweep_workers(self.redis, quiet_before=cutoff, host=self.host)

    @cached_property
    def looked_at_workers(self) -> dict[str, WorkerInfo]:
        """The workers read in full: those whose key is gone, that shut down, or that went
        quiet for the stale threshold by RQ's heartbeat, and those on this host (their
        processes are looked at). A few, unless it is a mass incident."""
        return self.worker_infos([*self.worker_sweep.unwell, *self.worker_sweep.nearby])

    @cached_property
    def suspect_workers(self) -> dict[str, WorkerInfo]:
        """The workers of the suspects. One the sweep saw well and busy is taken from the
        sweep (a mass incident in live workers reads no worker hash); the others are read
        in full."""
        sweep = self.worker_sweep
        names = {a.worker for a in self.suspects if a.worker}
        read_in_full = {*sweep.unwell, *sweep.nearby}
        swept = {
            name: WorkerInfo(
                name=name,
                registered=True,
                exists=True,
                state="busy",
                current_job=sweep.busy[name],
                beat_within=self.stale_after,
            )
            for name in names
            if name in sweep.busy and name not in read_in_full
        }
        return {**swept, **self.worker_infos(names - set(swept))}

    @cached_property
    def workers(self) -> dict[str, WorkerInfo]:
        """Every worker RQ lists, plus every worker a suspect names: a hash per worker, so
        read only for the evidence of a queue no worker takes work from."""
        registered = {text(key)[len(WORKER_PREFIX) :] for key in self.redis.smembers(WORKERS_KEY)}
        return self.worker_infos(registered | {a.worker for a in self.suspects})

    @cached_property
    def frozen_workers(self) -> list["FrozenWorker"]:
        """Workers RQ still lists whose RQ heartbeat is stale, and those RQ forgot (their key
        expired) while their process, on this host, is still there: a frozen worker keeps
        its pid but stops beating, and RQ drops it after worker_ttl + 60 s."""
        frozen = [
            FrozenWorker(
                name=info.name,
                host=info.hostname,
                pid=info.pid,
                queues=info.queues,
                last_heartbeat=info.last_heartbeat,
                current_job=info.current_job,
                heartbeat_age=info.heartbeat_age,
                in_rq=True,
                process=process_words(info.pid, info.hostname, self.host),
                process_created=(process_created(info.pid) if info.hostname == self.host else None),
                state=info.state,
            )
            for info in self.looked_at_workers.values()
            if info.exists and not info.died and info.unresponsive and _serves_keel(info.queues)
        ]
        earlier = Finding.objects.filter(code="worker_unresponsive", resolved_at__isnull=True).only(
            "subject", "evidence"
        )
        names = {
            (f.evidence or {}).get("name") or f.subject.removeprefix("worker:") for f in earlier
        }
        listed = {name for name, info in self.worker_infos(names).items() if info.exists}
        for finding in earlier:
            seen = finding.evidence or {}
            name = seen.get("name") or finding.subject.removeprefix("worker:")
            pid, host = seen.get("pid"), seen.get("host")
            if name in listed or host != self.host or not isinstance(pid, int):
                continue
            created = process_created(pid)
            if created is None or abs(created - (seen.get("process_created") or created)) > 1:
                continue  # gone, or its pid now belongs to another process
            frozen.append(
                FrozenWorker(
                    name=name,
                    host=host,
                    pid=pid,
                    queues=list(seen.get("queues") or []),
                    last_heartbeat=seen.get("rq_last_heartbeat") or "",
                    current_job=seen.get("current_job") or "",
                    heartbeat_age=None,
                    in_rq=False,
                    process=process_words(pid, host, self.host),
                    process_created=created,
                    state=seen.get("state") or "",
                )
            )
        return frozen

    @cached_property
    def suspended(self) -> bool:
        return bool(self.redis.exists(SUSPENDED_KEY))

    def live_listeners(self, queue: str) -> int:
        """How many workers take work from the queue: alive, and not frozen. Those the
        sweep found well elsewhere, and those read in full that are (an unwell one may be
        well after all: its silence counts from the end of an outage)."""
        looked_at = sum(
            1
            for w in self.looked_at_workers.values()
            if w.alive and not w.unresponsive and queue in w.queues
        )
        return self.worker_sweep.well_by_queue.get(queue, 0) + looked_at

    def dead_workers(self, queue: str) -> list[str]:
        """Workers of the queue that RQ says are gone, or whose process is gone."""
        return sorted(
            w.name for w in self.looked_at_workers.values() if queue in w.queues and not w.alive
        )

    def job_states(self, job_ids: list[str]) -> dict[str, dict]:
        """{job id: {"status": RQ's status or "missing", "worker": ...}} in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(f"rq:job:{job_id}", "status", "worker_name", "started_at")
            rows = pipe.execute()
        return {
            job_id: {
                "status": text(status) if status else "missing",
                "worker": text(worker or b""),
                "started_at": text(started or b""),
            }
            for job_id, (status, worker, started) in zip(job_ids, rows, strict=True)
        }

    @cached_property
    def running_jobs(self) -> dict[str, dict]:
        """What RQ says of each suspect's job: "started" for those a worker runs now (the
        worker sweep read every worker's current job); the others' hashes are read."""
        if not self.redis_ok:
            return {}
        ids = [a.rq_job_id for a in (*self.suspects, *self.lost_job_attempts)]
        run_by = self.job_workers
        states = self.job_states([job_id for job_id in ids if job_id not in run_by])
        states.update(
            {
                job_id: {"status": "started", "worker": run_by[job_id]}
                for job_id in ids
                if job_id in run_by
            }
        )
        return states

    @cached_property
    def job_workers(self) -> dict[str, str]:
        """{job id: worker name} of every Keel job a worker runs now, from the worker sweep
        (no read of RQ's started registries: 10 000 members took ~30 ms)."""
        return {job: name for name, job in self.worker_sweep.busy.items()}

    @cached_property
    def running_job_ids(self) -> dict[str, int]:
        """{job id: node run id} of the current attempt of every running node (one indexed
        query of two integers per node)."""
        running = (
            NodeRun.objects.filter(status=NodeRun.Status.RUNNING)
            .order_by()
            .values_list("pk", "attempt")
        )
        return {dispatch.job_id(pk, attempt): pk for pk, attempt in running}

    @cached_property
    def running_without_job(self) -> set[int]:
        """Running nodes whose RQ job is gone (Redis flushed or restarted).

        Cheap at any number of running nodes: their ids (one indexed query of two
        integers, while Redis runs the worker sweep) against the jobs the workers run;
        only the few no worker runs have their job hash read, to tell a missing job from
        one that has just ended or whose worker is gone.
        """
        running = self.running_job_ids
        run_by = self.job_workers
        unseen = {job_id: pk for job_id, pk in running.items() if job_id not in run_by}
        states = self.job_states(list(unseen))
        return {pk for job_id, pk in unseen.items() if states[job_id]["status"] == "missing"}

    # Database -----------------------------------------------------------------------------

    @cached_property
    def suspects(self) -> list[Suspect]:
        """The current attempt of each running node that meets a detector's suspect
        condition, with its node and run (two queries). Each detector then applies its
        exact rule; an attempt that meets no condition cannot be reported by any."""
        if not self.suspect_conditions:
            return []
        # The conditions are on the node runs alone (the claim gives a node its current
        # attempt's start): one pass over the running ones. Asked first whether any
        # meets one: when none does (a healthy tick), PostgreSQL planned the join below
        # as a parallel hash join whose workers took 10 ms to start.
        nodes = (
            NodeRun.objects.filter(status=NodeRun.Status.RUNNING)
            .filter(reduce(operator.or_, self.suspect_conditions))
            .order_by()
        )
        return self.current_attempts(nodes.values("pk")) if nodes.exists() else []

    @cached_property
    def lost_job_attempts(self) -> list[Suspect]:
        """The current attempt of each running node whose RQ job is gone (none, unless
        Redis lost its data). Not among ``suspects``: it waits for the worker sweep,
        which the other detectors' suspects need not."""
        lost = sorted(self.running_without_job)
        return self.current_attempts(lost) if lost else []

    def current_attempts(self, node_run_ids) -> list[Suspect]:
        """The current attempt of each of these running nodes (ids, or a query of them),
        with its node and run, in one query."""
        rows = (
            NodeAttempt.objects.filter(
                node_run_id__in=node_run_ids,
                node_run__status=NodeRun.Status.RUNNING,
                number=F("node_run__attempt"),
            )
            .order_by("node_run_id")
            .values_list(
                "pk",
                *SUSPECT_ATTEMPT_FIELDS,
                *(f"node_run__{name}" for name in SUSPECT_NODE_FIELDS),
                "node_run__run__workflow_id",
            )
        )
        return [_suspect(row) for row in rows]

    def quiet_since(self, seconds: float) -> Q:
        """Suspects: running nodes with no heartbeat (or claim) in the last ``seconds``."""
        cutoff = self.now - timedelta(seconds=seconds)
        return Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)

    @cached_property
    def outage_ends(self) -> dict[tuple[str, str], datetime]:
        """When the last outage of the database and of Redis ended, from the findings
        that recorded them (one still open counts until it was last seen)."""
        ends = {}
        for code, subject in (DB_OUTAGE, REDIS_OUTAGE):
            row = (
                Finding.objects.filter(code=code, subject=subject)
                .order_by(F("resolved_at").desc(nulls_first=True))
                .values_list("resolved_at", "last_seen")
                .first()
            )
            if row is not None:
                ends[(code, subject)] = min(row[0] or row[1], self.now)
        return ends

    @property
    def db_outage_end(self) -> datetime | None:
        return self.outage_ends.get(DB_OUTAGE)

    @property
    def rq_outage_end(self) -> datetime | None:
        """The later end of a Redis or a database outage: a worker's loop waits on both."""
        ends = [self.outage_ends.get(REDIS_OUTAGE), self.db_outage_end]
        return max((end for end in ends if end is not None), default=None)

    def beat_age(self, beat: datetime | None) -> float:
        """Seconds since a heartbeat written to the database, counted from the end of the
        last database outage when that is later: nothing could beat during it."""
        end = self.db_outage_end
        if beat is None:
            return 0.0
        return self.age(max(beat, end) if end is not None else beat)

    @cached_property
    def queued_by_queue(self) -> dict[str, dict]:
        rows = (
            NodeRun.objects.filter(status=NodeRun.Status.QUEUED)
            .values("queue")
            .annotate(count=Count("id"), oldest=Min("queued_at"))
        )
        return {row["queue"]: row for row in rows}

    # Verdicts -----------------------------------------------------------------------------

    def age(self, moment: datetime | None) -> float:
        return (self.now - moment).total_seconds() if moment else 0.0

    def liveness(self, attempt: NodeAttempt) -> Liveness:
        """Gather the evidence about an attempt's process and decide whether it is lost.

        1. Heartbeat age: from the last beat (or the claim when it never beat), or from
           the end of the last database outage when that is later.
        2. Same host: does the pid exist (and is it not a newer process or a zombie)?
        3. RQ: is its worker still registered and heartbeating, does it still run the
           attempt's job, and what does RQ say about that job?
        4. Alive when its pid runs on this host, or its worker heartbeats to RQ and still
           runs its job: then it is never lost, whatever else RQ says.
        5. Otherwise lost when: the process is gone and no beat came for 1.5 beats; or no
           beat for the stale threshold and RQ lost the worker; or RQ ended the job (the
           work horse ended) and no beat came for 1.5 beats.
        """
        if attempt.pk in self._liveness:
            return self._liveness[attempt.pk]
        node = attempt.node_run
        beat = node.heartbeat_at or attempt.started_at
        never = node.heartbeat_at is None or node.heartbeat_at == node.started_at
        if attempt.host == self.host:
            process, detail = process_state(attempt.pid, attempt.started_at)
        else:
            process, detail = "unknown", f"runs on host {attempt.host or '?'}, not this one"
        worker = job_status = None
        if self.redis_ok:
            worker = self.suspect_workers.get(attempt.worker)
            job_status = self.running_jobs.get(attempt.rq_job_id, {}).get("status")
        age = self.beat_age(beat)
        outage = (
            self.db_outage_end
            if beat and self.db_outage_end and self.db_outage_end > beat
            else None
        )
        stale = age > self.stale_after
        quiet = age > 1.5 * self.heartbeat
        alive = ""
        if process == "alive":
            alive = detail
        elif worker is not None and worker.responsive and worker.current_job == attempt.rq_job_id:
            alive = f"worker {worker.name} heartbeats to RQ and still runs job {attempt.rq_job_id}"
        because = ""
        if alive:
            pass  # never lost while seen alive: a silent one is heartbeat_stale's to report
        elif process == "dead" and quiet:
            because = f"its process is gone: {detail}"
        elif stale and worker is not None and not worker.alive:
            because = worker.gone_because()
        elif quiet and job_status in ENDED_JOB_STATES:
            because = (
                f"RQ reports its job {attempt.rq_job_id} as {job_status} (the process running "
                "it ended without committing an outcome)"
            )
        verdict = Liveness(age, never, process, detail, worker, job_status, because, alive, outage)
        self._liveness[attempt.pk] = verdict
        return verdict

    @cached_property
    def stale_after(self) -> float:
        return setting("KEEL_STALE_BEATS", 3) * self.heartbeat


# One thread for the worker sweep, shared by every tick of this process.
_SWEEPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-sweep")


@dataclass
class FrozenWorker:
    """A worker that no longer heartbeats to RQ while its process is (or may be) there."""

    name: str
    host: str
    pid: int | None
    queues: list[str]
    last_heartbeat: str
    current_job: str
    heartbeat_age: float | None
    in_rq: bool  # False: RQ forgot it (its key expired); its process is still on this host
    process: str  # what the process table says, in words
    process_created: float | None
    state: str = ""

    def kill_command(self, this_host: str) -> str:
        kill = f"kill -9 {self.pid or '<pid>'}"
        return kill if self.host == this_host else f"ssh {self.host or '<host>'} {kill}"


def _redis():
    return dispatch.redis_connection()


def _serves_keel(queues: list[str]) -> bool:
    """A Keel worker listens to one of Keel's queues (RQ's key does not name its class)."""
    return bool(set(queues) & set(settings.KEEL_QUEUES))


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def rq_time(value: str) -> datetime:
    """RQ's UTC text ("2026-12-05T11:43:14.123456Z") as an aware datetime; ValueError if
    it is not that (fromisoformat: far cheaper than RQ's strptime at 10 000 workers)."""
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def rq_clock(beat: str) -> str:
    """An RQ heartbeat (UTC text) as the time of day in the server's zone."""
    try:
        return clock(utcparse(beat))
    except ValueError:
        return beat or "?"


class Seconds(Func):
    """A number of seconds in the database (a column, or arithmetic on one) as a duration
    that can be subtracted from a moment, on PostgreSQL and SQLite alike."""

    output_field = DurationField()
    template = "(%(expressions)s * INTERVAL '1 second')"

    def as_sqlite(self, compiler, connection, **extra):
        # SQLite keeps a duration as whole microseconds.
        return self.as_sql(
            compiler, connection, template="CAST(%(expressions)s * 1000000 AS INTEGER)", **extra
        )


def seconds_of(expression) -> Seconds:
    return Seconds(expression)


def clock(moment: datetime | None) -> str:
    """A moment as the time of day (the server's zone), for a finding's title: a title
    says since when, never "for how long", so it stays the same while nothing changes."""
    # The server's zone (the default one: the watchdog activates none), read once.
    return f"{moment.astimezone(_server_zone()):%H:%M:%S}" if moment else "?"


@cache
def _server_zone():
    return timezone.get_default_timezone()


def node_subject(node_run_id: int, attempt: int | None = None) -> str:
    return f"node_run:{node_run_id}" + (f":{attempt}" if attempt is not None else "")


def about_attempt(attempt: NodeAttempt) -> dict:
    """The subject fields of a detection about a running attempt (run, node, queue, worker)."""
    node = attempt.node_run
    return {
        "run_id": node.run_id,
        "node_run_id": node.pk,
        "queue": attempt.queue,
        "worker": attempt.worker,
        "attempt_id": attempt.pk,
    }


def attempt_evidence(ctx: Context, attempt: NodeAttempt) -> dict:
    node = attempt.node_run
    return {
        "run": node.run_id,
        "node": node.node_key,
        "node_type": node.node_type,
        "attempt": attempt.number,
        "max_attempts": node.max_attempts,
        "queue": attempt.queue,
        "worker": attempt.worker,
        "host": attempt.host,
        "pid": attempt.pid,
        "rq_job_id": attempt.rq_job_id,
        "started_at": iso(attempt.started_at),
        "heartbeat_at": iso(node.heartbeat_at),
        "heartbeat_interval_seconds": ctx.heartbeat,
        "progress": node.progress,
        "resource_samples": (attempt.resource_samples or [])[-3:],
    }


def retry_action(node: NodeRun) -> dict:
    return {"kind": "retry_node", "run": node.run_id, "node": node.node_key}


def worker_command(queue: str) -> dict:
    return {"kind": "command", "command": f"manage.py rqworker {queue}"}
