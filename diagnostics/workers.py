"""Every RQ worker Redis knows of, and what each runs now: the Workers page,
``manage.py workers`` and ``GET /api/v1/workers`` read ``list_workers``.

Two Redis round trips whatever the number of workers (``rq_state.sweep_workers`` inside
Redis, then one pipeline of the hashes shown) and at most two database queries (the
attempts the busy workers run; the earlier workers of systemd-named slots). RQ's hashes are
evidence; what a node is doing comes from the database.
"""

import re
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlencode

import redis
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from diagnostics import health, rq_state, system_report
from workflows.models import NodeAttempt, NodeRun

# Workers read in full for one listing: those gone quiet or shut down first, then the busy
# ones, those on this host, then the rest (every one is counted in ``registered``). A page
# of 100 stays under 100 ms with 10 000 busy workers (bench.scale; 500 took 170 ms);
# `manage.py workers --limit` and the API's `limit` read more.
WORKERS_SHOWN = 100
# The states a worker is shown in, worst first: as rq_state judges its hash and process.
STATES = ("dead", "unresponsive", "busy", "suspended", "idle")
KEEL_JOB = re.compile(r"^keel-(?P<node_run>\d+)-(?P<attempt>\d+)$")
# deploy/systemd/keel-worker@.service names each start <host>-<instance>-<invocation id>.
SYSTEMD_NAME = re.compile(r"^(?P<slot>.+)-[0-9a-f]{32}$")
# How far back attempts are read to find the earlier workers of a systemd slot.
RESTART_WINDOW = timedelta(hours=1)


@dataclass
class CurrentNode:
    """The node attempt a worker's current job carries, as the database has it now."""

    job_id: str
    run_id: int
    workflow: str
    node_key: str
    attempt: int
    attempt_status: str
    node_status: str
    # The node still runs this very attempt: what "stop the current node" would end.
    running: bool
    started_at: datetime | None
    heartbeat_at: datetime | None
    url: str


@dataclass
class Restarts:
    """How many earlier workers the same host and process slot had, and how we know.

    ``count`` is None when nothing honest says: a worker neither supervised by devstack nor
    named by the systemd unit. ``exact`` is False for a lower bound.
    """

    count: int | None
    exact: bool
    source: str  # "devstack", "worker names", or "" (unknown)
    note: str


@dataclass
class Worker:
    name: str
    host: str
    pid: int | None
    queues: list[str]
    state: str  # one of STATES
    rq_state: str  # what the worker last wrote itself (busy, idle, suspended, started…)
    current_job: str
    current: CurrentNode | None
    since: datetime | None  # when the current node's attempt started
    last_heartbeat: datetime | None
    birth: datetime | None
    successful_jobs: int
    failed_jobs: int
    working_seconds: float
    restarts: Restarts = field(default_factory=lambda: Restarts(None, False, "", ""))

    @property
    def can_stop_current(self) -> bool:
        return self.current is not None and self.current.running


@dataclass
class WorkerList:
    workers: list[Worker]
    registered: int | None  # how many workers RQ lists (None: Redis could not be read)
    hidden: int  # listed by RQ, not read (past the limit)
    error: str  # why Redis could not be read
    generated_at: datetime

    @property
    def counts(self) -> dict[str, int]:
        """How many of the workers shown are in each state, worst first."""
        counts = dict.fromkeys(STATES, 0)
        for worker in self.workers:
            counts[worker.state] += 1
        return counts

    def as_dict(self) -> dict:
        return {
            "generated_at": self.generated_at,
            "registered": self.registered,
            "shown": len(self.workers),
            "hidden": self.hidden,
            "error": self.error,
            "counts": self.counts,
            "workers": [asdict(worker) for worker in self.workers],
        }


def list_workers(client: redis.Redis | None = None, *, limit: int = WORKERS_SHOWN) -> WorkerList:
    """Every worker RQ lists (up to ``limit`` read in full), sorted by host and name.

    1. One sweep inside Redis names the workers gone quiet or shut down, the busy ones,
       those on this host, and a sample of the rest; up to ``limit`` of them, in that
       order, are read in one pipeline (rq_state.read_workers judges alive/unresponsive).
    2. A Keel job id (keel-<node run>-<attempt>) leads to its attempt, node and run: one
       query for every busy worker.
    3. Restarts: from devstack's record, or from systemd worker names (``_restarts``).
    Redis down: an empty list with ``error`` saying why; never an exception.
    """
    client = client or health.probe_client()
    now = timezone.now()
    try:
        names, registered = _names_to_read(client, now, limit)
        hashes = rq_state.read_workers(client, names) if names else []
    except redis.RedisError as error:
        return WorkerList([], None, 0, health.error_text(error), now)
    workers = [_worker(fields) for fields in hashes]
    _attach_current_nodes(workers)
    _attach_restarts(workers, now)
    workers.sort(key=lambda worker: (worker.host, worker.name))
    return WorkerList(workers, registered, max(registered - len(names), 0), "", now)


def judge(fields: dict) -> str:
    """A worker's state from its RQ hash as rq_state read it (one of STATES)."""
    if not fields["alive"]:
        return "dead"
    if fields["unresponsive"]:
        return "unresponsive"
    if fields["state"] == "busy" or fields["current_job"]:
        return "busy"
    if fields["state"] == "suspended":
        return "suspended"
    return "idle"


def _names_to_read(client: redis.Redis, now: datetime, limit: int) -> tuple[list[str], int]:
    stale_after = settings.KEEL_STALE_BEATS * settings.KEEL_HEARTBEAT_SECONDS
    sweep = rq_state.sweep_workers(
        client,
        quiet_before=now - timedelta(seconds=stale_after),
        host=socket.gethostname(),
        sample=limit,
    )
    ordered = dict.fromkeys([*sweep.unwell, *sweep.busy, *sweep.nearby, *sweep.sample])
    return list(ordered)[:limit], sweep.registered


def _worker(fields: dict) -> Worker:
    return Worker(
        name=fields["name"],
        host=fields["hostname"],
        pid=fields["pid"],
        queues=fields["queues"],
        state=judge(fields),
        rq_state=fields["state"],
        current_job=fields["current_job"],
        current=None,
        since=None,
        last_heartbeat=fields["last_heartbeat"],
        birth=fields["birth"],
        successful_jobs=fields["successful_jobs"],
        failed_jobs=fields["failed_jobs"],
        working_seconds=fields["working_seconds"],
    )


def _attach_current_nodes(workers: list[Worker]) -> None:
    """Each busy worker's node attempt, from the database: one query for all of them."""
    wanted = {}
    for worker in workers:
        match = KEEL_JOB.match(worker.current_job)
        if match:
            wanted[worker.name] = (int(match["node_run"]), int(match["attempt"]))
    if not wanted:
        return
    rows = NodeAttempt.objects.filter(
        node_run_id__in={node_run for node_run, _ in wanted.values()},
        number__in={number for _, number in wanted.values()},
    ).values(
        "node_run_id",
        "number",
        "status",
        "started_at",
        "node_run__run_id",
        "node_run__run__workflow__slug",
        "node_run__node_key",
        "node_run__status",
        "node_run__attempt",
        "node_run__heartbeat_at",
    )
    attempts = {(row["node_run_id"], row["number"]): row for row in rows}
    for worker in workers:
        row = attempts.get(wanted.get(worker.name))
        if row is None:
            continue
        run_id, key = row["node_run__run_id"], row["node_run__node_key"]
        worker.current = CurrentNode(
            job_id=worker.current_job,
            run_id=run_id,
            workflow=row["node_run__run__workflow__slug"],
            node_key=key,
            attempt=row["number"],
            attempt_status=row["status"],
            node_status=row["node_run__status"],
            running=row["node_run__status"] == NodeRun.Status.RUNNING
            and row["node_run__attempt"] == row["number"],
            started_at=row["started_at"],
            heartbeat_at=row["node_run__heartbeat_at"],
            url=f"{reverse('dashboard:run-detail', args=[run_id])}?{urlencode({'node': key})}",
        )
        worker.since = row["started_at"]


def _attach_restarts(workers: list[Worker], now: datetime) -> None:
    """How many earlier workers each live worker's host and process slot had.

    Neither RQ nor Keel keeps a count of restarts, so only what says it honestly is used:

    * devstack (``make run``) counts the restarts of the worker it supervises: a worker on
      this host whose pid is its child's gets that count (exact).
    * The systemd unit names each start ``<host>-<instance>-<invocation id>``: the other
      names of the same ``<host>-<instance>`` that Redis still lists (RQ keeps a dead
      worker's key for minutes) or that ran a node attempt on that host within
      RESTART_WINDOW are earlier workers of the slot. A lower bound: a worker that ran no
      node and that RQ has forgotten leaves no trace.
    * Anything else (a Procfile, a name of one's own): unknown, never a guess.
    A dead worker's restarts are the live worker of its slot's to count.
    """
    here = socket.gethostname()
    supervision = system_report.supervision()
    supervised = (
        {
            process["pid"]: process["restarts"]
            for process in supervision["processes"]
            if process["pid"] and process["state"] == "running"
        }
        if supervision["supervised"] and not supervision["stale"]
        else {}
    )
    slots: dict[str, set[str]] = {}
    for worker in workers:
        match = SYSTEMD_NAME.match(worker.name)
        if match:
            slots.setdefault(match["slot"], set()).add(worker.name)
    named_hosts = {w.host for w in workers if SYSTEMD_NAME.match(w.name) and w.state != "dead"}
    if named_hosts:
        # The attempt_finished index bounds the read to the window.
        earlier = (
            NodeAttempt.objects.filter(finished_at__gte=now - RESTART_WINDOW, host__in=named_hosts)
            .exclude(worker="")
            .values_list("worker", flat=True)
            .distinct()
        )
        for name in earlier:
            match = SYSTEMD_NAME.match(name)
            if match and match["slot"] in slots:
                slots[match["slot"]].add(name)
    window = f"{int(RESTART_WINDOW.total_seconds() // 3600)} h"
    for worker in workers:
        match = SYSTEMD_NAME.match(worker.name)
        if worker.state == "dead":
            worker.restarts = Restarts(
                None, False, "", "a dead worker: the live worker of its slot counts restarts"
            )
        elif worker.host == here and worker.pid in supervised:
            count = supervised[worker.pid]
            worker.restarts = Restarts(
                count, True, "devstack", f"restarted {count} time(s) by devstack (make run)"
            )
        elif match:
            count = len(slots[match["slot"]] - {worker.name})
            worker.restarts = Restarts(
                count,
                False,
                "worker names",
                f"at least {count} earlier worker(s) of {match['slot']} in the last {window}: "
                "named by the systemd unit, still listed by RQ or seen running a node",
            )
        else:
            worker.restarts = Restarts(
                None,
                False,
                "",
                "unknown: not supervised by devstack and not named <host>-<instance>-<id> by "
                "the systemd unit",
            )
