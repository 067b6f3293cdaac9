"""Keel's per-node overhead against raw RQ: same Redis, same database, same worker class.

    .venv/bin/python -m bench.engine [--nodes 1000] [--chain 100] [--worker forking,simple]
                                     [--repeat 1] [--profile]

For each worker class (forking: a work horse per job; simple: jobs in the worker
process) it measures, with exactly one ``manage.py rqworker --burst`` started only once
everything is enqueued:

1. raw RQ: ``--nodes`` no-op jobs (bench.jobs.noop), then a ``--chain``-job
   ``depends_on`` chain;
2. Keel: a ``--nodes``-node workflow of independent ``keel.noop`` nodes, then a
   ``--chain``-node chain (each node ``after`` the previous one);

and prints per-node cost, chain hop p50 and the Keel/RQ ratios against the 1.5x target
(medians over ``--repeat`` rounds: on a busy machine single rounds vary by a third).
Each job's time is then split into phases (from the RQ job hashes, for Keel's jobs too,
beside the NodeAttempt timestamps), and ``--profile`` lists the SQL statements of one
Keel attempt, run in-process.

By default it works on throwaway stores: with DATABASE_URL pointing at PostgreSQL, a
fresh database ``keel_bench_<pid>`` on that server (created, migrated, dropped);
otherwise a temporary SQLite file. Redis is an embedded redis-server in a temporary
directory unless REDIS_URL is set; a shared Redis should be given a database number
nobody else uses (redis://127.0.0.1:6379/14): the bench refuses a database whose queues
hold jobs or workers or that has Keel jobs (its job ids restart at keel-1-1), fails if a
foreign worker ran any of its jobs, and deletes only its own keys afterwards. The workers get the same
DATABASE_URL / REDIS_URL and run with DEBUG=0, as in production (DEBUG=1 would make
Django record every query). Exit status is 0 when the measurement completed, whether or
not the targets were met.
"""

import argparse
import contextlib
import itertools
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BASE_DIR = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.5
QUEUES = ("high", "default", "low")
# Keel's nodes go to "default" (the node priority); raw RQ's jobs go there too.
QUEUE = "default"
NOOP_FUNC = "bench.jobs.noop"
SERIALIZER = "rq.serializers.JSONSerializer"
WORKER_CLASSES = {
    "forking": {"rq": "rq.worker.Worker", "keel": "workflows.runtime.worker.KeelWorker"},
    "simple": {"rq": "rq.worker.SimpleWorker", "keel": "workflows.runtime.worker.KeelSimpleWorker"},
}
# As Keel's dispatch: the same job timeout (KEEL_DEFAULT_TIMEOUT) and result TTLs.
JOB_TIMEOUT = 30
RESULT_TTL = 600
FAILURE_TTL = 24 * 3600
WORKER_TIMEOUT = 900
REGISTRIES = ("finished", "failed", "started", "deferred", "canceled", "scheduled")

MEASURED = """\
How the numbers are measured (one worker, started in burst mode after everything is enqueued).
Raw RQ: the job hashes' started_at/ended_at, set right around the job function. Keel has two
clocks per node, the job hash and the NodeAttempt's claim (started_at) and outcome
(finished_at); it is measured with whichever is less favourable to it.
  per-node cost  (last end - first start) / N over the N-node batch (Keel: the earliest start,
                 the latest end). Everything between jobs counts: dequeue, fork, RQ's
                 bookkeeping and, for Keel, the claim and the report (transaction, enqueue).
  chain hop      end of node i -> start of node i+1 over the chain, median (p50) and p90
                 (Keel: the earliest end, the latest start). Raw RQ: a depends_on chain (RQ
                 enqueues the dependent). Keel: a chain of nodes (the engine queues node i+1
                 when it records node i's success).
  Keel/RQ        Keel's number divided by raw RQ's, same worker class; the target is <= {target}x."""


@dataclass
class Stores:
    database_label: str = ""
    redis_label: str = ""
    external_redis: bool = False
    env: dict = field(default_factory=dict)
    job_ids: list = field(default_factory=list)
    worker_names: list = field(default_factory=list)
    had_queue_set: bool = True


@dataclass
class Batch:
    """Timestamps of one measured batch, in run order: start[i], end[i] of node i.

    A node with two clocks (Keel's: the RQ job hash and the NodeAttempt stamps) gives
    the ones least favourable to it: for the per-node cost the earliest start and the
    latest end (``starts``, ``ends``), for hops the latest start and the earliest end
    (``hop_starts``, ``hop_ends``).
    """

    starts: list
    ends: list
    hop_starts: list | None = None
    hop_ends: list | None = None

    @classmethod
    def of_two_clocks(cls, first: tuple[list, list], second: tuple[list, list]) -> "Batch":
        (starts_a, ends_a), (starts_b, ends_b) = first, second
        return cls(
            starts=list(map(min, starts_a, starts_b)),
            ends=list(map(max, ends_a, ends_b)),
            hop_starts=list(map(max, starts_a, starts_b)),
            hop_ends=list(map(min, ends_a, ends_b)),
        )

    @property
    def per_node(self) -> float:
        return (max(self.ends) - min(self.starts)).total_seconds() / len(self.starts)

    def hops(self) -> list[float]:
        starts = self.hop_starts or self.starts
        ends = self.hop_ends or self.ends
        return [
            (following - end).total_seconds()
            for end, following in zip(ends, starts[1:], strict=False)
        ]


# --- Stores: throwaway database and Redis -----------------------------------------------------


def prepare_stores(stack: contextlib.ExitStack, tmp: Path) -> Stores:
    """Point this process (and the workers) at a fresh database and a Redis we may use.

    1. Environment the settings read: KEEL_VAR_DIR in ``tmp``, DEBUG=0, a random
       SECRET_KEY when none is set (never printed).
    2. PostgreSQL DATABASE_URL: create ``keel_bench_<pid>`` on that server (dropped on
       exit); anything else: a SQLite file in ``tmp``.
    3. REDIS_URL set: check its queues are idle; unset: an embedded redis-server in ``tmp``.
    4. Set up Django and migrate the fresh database.
    """
    stores = Stores()
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["KEEL_VAR_DIR"] = str(tmp)
    os.environ["KEEL_EMBEDDED_REDIS_SOCKET"] = str(tmp / "redis.sock")
    os.environ["DEBUG"] = "0"
    if not os.environ.get("SECRET_KEY"):
        os.environ["SECRET_KEY"] = secrets.token_urlsafe(50)

    database_url = os.environ.get("DATABASE_URL", "")
    if urlsplit(database_url).scheme in ("postgres", "postgresql"):
        name = f"keel_bench_{os.getpid()}"
        os.environ["DATABASE_URL"] = _create_postgres_database(database_url, name)
        stack.callback(_drop_postgres_database, database_url, name)
        stores.database_label = f"throwaway database {name}"
    else:
        if database_url:
            print(f"DATABASE_URL is not PostgreSQL; using a temporary SQLite file in {tmp}.")
        os.environ["DATABASE_URL"] = f"sqlite:///{tmp / 'bench.sqlite3'}"
        stores.database_label = "temporary file"

    from config import embedded_redis

    if os.environ.get("REDIS_URL"):
        stores.external_redis = True
    else:
        socket_path = tmp / "redis.sock"
        stack.callback(embedded_redis.stop, embedded_redis.start(socket_path))
        os.environ["REDIS_URL"] = embedded_redis.socket_url(socket_path)

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    stores.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    from django.db import connection

    from workflows.runtime import dispatch

    redis = dispatch.redis_connection()
    redis_version = redis.info("server")["redis_version"]
    if stores.external_redis:
        _check_redis_is_idle(redis)
        stores.had_queue_set = bool(redis.exists("rq:queues"))
        stack.callback(_delete_own_keys, redis, stores)
        stores.redis_label = f"Redis {redis_version} at {dispatch.redacted_redis_url()}"
    else:
        stores.redis_label = f"Redis {redis_version} embedded (unix socket)"
    vendor = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(
            "SHOW server_version"
            if connection.vendor == "postgresql"
            else "SELECT sqlite_version()"
        )
        stores.database_label = f"{vendor} {cursor.fetchone()[0]} ({stores.database_label})"
    return stores


def _create_postgres_database(url: str, name: str) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(url, name)


def _drop_postgres_database(url: str, name: str) -> None:
    import psycopg
    from django.db import connections
    from psycopg import sql

    connections.close_all()
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _check_redis_is_idle(redis) -> None:
    from rq import Worker

    busy = [name for name in QUEUES if redis.llen(f"rq:queue:{name}")]
    listening = [
        worker.name
        for worker in Worker.all(connection=redis)
        if set(worker.queue_names()) & set(QUEUES)
    ]
    # Keel's job ids restart at keel-1-1 in the fresh database: they must not meet others.
    keel_jobs = next(redis.scan_iter("rq:job:keel-*", count=1000), None)
    if busy or listening or keel_jobs:
        raise SystemExit(
            f"REDIS_URL is in use (jobs waiting in: {', '.join(busy) or 'none'}; workers: "
            f"{', '.join(listening) or 'none'}; Keel jobs: {'yes' if keel_jobs else 'none'}). Give the bench a Redis database of "
            "its own, e.g. REDIS_URL=redis://127.0.0.1:6379/14, or leave REDIS_URL unset."
        )


def _delete_own_keys(redis, stores: Stores) -> None:
    """Remove the bench's jobs and their traces from a shared Redis, and nothing else."""
    ids = stores.job_ids
    with redis.pipeline(transaction=False) as pipe:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            pipe.delete(
                *(
                    f"rq:{kind}:{job_id}{suffix}"
                    for job_id in chunk
                    for kind, suffix in (
                        ("job", ""),
                        ("job", ":dependents"),
                        # rq 2.x spells this one with a double colon.
                        ("job:", ":dependencies"),
                        ("results", ""),
                        ("executions", ""),
                    )
                )
            )
            for queue in QUEUES:
                for registry in REGISTRIES:
                    pipe.zrem(f"rq:{registry}:{queue}", *chunk)
            pipe.execute()
    if stores.worker_names:
        redis.delete(*(f"rq:worker:{name}" for name in stores.worker_names))
    # RQ's set of queue names: ours if the bench created it and the queues are empty again.
    if not stores.had_queue_set and not any(redis.llen(f"rq:queue:{name}") for name in QUEUES):
        redis.delete("rq:queues")


# --- Workers ----------------------------------------------------------------------------------


def run_worker(stores: Stores, tmp: Path, worker_class: str, label: str) -> str:
    """Run one burst worker until the queues are empty; return its name."""
    # Numbered: a burst worker's key outlives it for a minute, and names must be unique.
    name = f"bench-{os.getpid()}-{len(stores.worker_names)}-{label}"
    stores.worker_names.append(name)
    log_path = tmp / f"{name}.log"
    command = [
        sys.executable,
        "manage.py",
        "rqworker",
        *QUEUES,
        "--burst",
        "--name",
        name,
        "--worker-class",
        worker_class,
        "--serializer",
        SERIALIZER,
    ]
    with log_path.open("w") as log:
        process = subprocess.run(
            command,
            cwd=BASE_DIR,
            env=stores.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=WORKER_TIMEOUT,
            check=False,
        )
    if process.returncode != 0:
        raise RuntimeError(
            f"worker {label} exited with {process.returncode}:\n{_log_tail(tmp, name)}"
        )
    return name


def _log_tail(tmp: Path, worker_name: str, lines: int = 30) -> str:
    log = (tmp / f"{worker_name}.log").read_text(errors="replace")
    return "".join(log.splitlines(keepends=True)[-lines:])


def check_jobs(jobs: list, worker_name: str, what: str) -> None:
    """Every job finished, and by our worker: another worker on the queues spoils the numbers."""
    from rq.job import JobStatus

    unfinished = [
        job for job in jobs if job is None or job.get_status(refresh=False) != JobStatus.FINISHED
    ]
    if unfinished:
        raise RuntimeError(f"{what}: {len(unfinished)} job(s) did not finish")
    strangers = {job.worker_name for job in jobs} - {worker_name}
    if strangers:
        raise RuntimeError(
            f"{what}: jobs were taken by other workers ({', '.join(sorted(strangers))}); "
            "give the bench a Redis database nobody else uses."
        )


# --- Raw RQ -----------------------------------------------------------------------------------


@dataclass
class Measured:
    batch: Batch
    enqueue_seconds: float
    phases: dict = field(default_factory=dict)  # phase name -> seconds, one per node


def rq_batch(stores: Stores, tmp: Path, kind: str, count: int, chained: bool) -> Measured:
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from workflows.runtime import dispatch

    shape = "chain" if chained else "batch"
    queue = dispatch.get_queue(QUEUE)
    # Unique across repeats: a finished job of the previous repeat is still in Redis.
    batch_number = sum(1 for name in stores.worker_names if name.endswith(f"rq-{kind}-{shape}"))
    ids = [
        f"bench-{os.getpid()}-{kind}-{shape}{batch_number}-{index:05d}" for index in range(count)
    ]
    stores.job_ids.extend(ids)
    options = {"result_ttl": RESULT_TTL, "failure_ttl": FAILURE_TTL}
    started = time.monotonic()
    if chained:
        for index, job_id in enumerate(ids):
            queue.enqueue_call(
                NOOP_FUNC,
                args=(index,),
                timeout=JOB_TIMEOUT,
                job_id=job_id,
                depends_on=ids[index - 1] if index else None,
                **options,
            )
    else:
        queue.enqueue_many(
            [
                Queue.prepare_data(
                    NOOP_FUNC, args=(index,), timeout=JOB_TIMEOUT, job_id=job_id, **options
                )
                for index, job_id in enumerate(ids)
            ]
        )
    enqueue_seconds = time.monotonic() - started
    worker = run_worker(stores, tmp, WORKER_CLASSES[kind]["rq"], f"rq-{kind}-{shape}")
    jobs = Job.fetch_many(ids, connection=dispatch.redis_connection(), serializer=JSONSerializer)
    check_jobs(jobs, worker, f"raw RQ {kind} {shape}")
    ordered = sorted(jobs, key=lambda job: job.started_at)
    phases = {
        "rq start -> rq end": [_seconds(job.started_at, job.ended_at) for job in ordered],
        "rq end -> next rq start": _gaps(ordered),
    }
    return Measured(
        Batch([job.started_at for job in jobs], [job.ended_at for job in jobs]),
        enqueue_seconds,
        phases,
    )


def _gaps(ordered_jobs: list) -> list[float]:
    return [
        _seconds(job.ended_at, following.started_at)
        for job, following in itertools.pairwise(ordered_jobs)
    ]


# --- Keel -------------------------------------------------------------------------------------


def keel_batch(stores: Stores, tmp: Path, kind: str, count: int, chained: bool) -> Measured:
    from workflows import engine
    from workflows.definitions import versioning
    from workflows.models import NodeAttempt, NodeRun, Run

    shape = "chain" if chained else "batch"
    version = versioning.load_definition(definition(count, chained), actor="bench").version
    started = time.monotonic()
    run = engine.start_run(version, params={}, trigger="bench")
    start_seconds = time.monotonic() - started
    try:
        worker = run_worker(stores, tmp, WORKER_CLASSES[kind]["keel"], f"keel-{kind}-{shape}")
    finally:
        attempts = list(
            NodeAttempt.objects.filter(node_run__run=run)
            .order_by("node_run__node_key", "number")
            .values_list("started_at", "finished_at", "rq_job_id")
        )
        stores.job_ids.extend(job_id for *_, job_id in attempts)
    run.refresh_from_db()
    if run.status != Run.Status.SUCCEEDED:
        counts = Counter(NodeRun.objects.filter(run=run).values_list("status", flat=True))
        raise RuntimeError(
            f"Keel {kind} {shape}: run {run.pk} is {run.status} ({dict(counts)}) after the "
            f"burst worker finished; worker log:\n{_log_tail(tmp, worker)}"
        )
    if len(attempts) != count:
        raise RuntimeError(f"Keel {kind} {shape}: {len(attempts)} attempts for {count} nodes")
    jobs = _keel_jobs(attempts, worker, f"Keel {kind} {shape}")
    batch = Batch.of_two_clocks(
        ([job.started_at for job in jobs], [job.ended_at for job in jobs]),
        ([row[0] for row in attempts], [row[1] for row in attempts]),
    )
    return Measured(batch, start_seconds, _phases(attempts, jobs))


def definition(count: int, chained: bool) -> str:
    shape = "chain" if chained else "batch"
    lines = [
        f"name: Bench {shape} of {count}",
        f"slug: bench-{shape}-{count}",
        "nodes:",
    ]
    for index in range(count):
        after = f", after: [n{index - 1:05d}]" if chained and index else ""
        lines.append(f"  n{index:05d}: {{type: keel.noop{after}}}")
    return "\n".join(lines) + "\n"


def _keel_jobs(attempts: list, worker: str, what: str) -> list:
    """The RQ jobs of the attempts, in the attempts' order, checked as raw RQ's are."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from workflows.runtime import dispatch

    jobs = Job.fetch_many(
        [job_id for *_, job_id in attempts],
        connection=dispatch.redis_connection(),
        serializer=JSONSerializer,
    )
    check_jobs(jobs, worker, what)
    return jobs


def _phases(attempts: list, jobs: list) -> dict:
    """Each Keel job as RQ saw it, and the attempt as the engine stamped it.

    rq start -> rq end       the job function: in a forking worker's horse, the node with
                             its context and heartbeat (the worker claimed before forking
                             and reports after the horse ends); in a simple worker, also
                             the claim and the report
    rq end -> next rq start  between jobs: RQ's bookkeeping, the horse's exit, the
                             forking worker's report and next claim, dequeue, fork
    claim -> outcome         NodeAttempt.started_at to finished_at (the engine's stamps)
    """
    rows = sorted(zip(attempts, jobs, strict=True), key=lambda pair: pair[1].started_at)
    return {
        "rq start -> rq end": [_seconds(job.started_at, job.ended_at) for _, job in rows],
        "rq end -> next rq start": _gaps([job for _, job in rows]),
        "claim -> outcome": [_seconds(claim, outcome) for (claim, outcome, _), _ in rows],
    }


def _seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


# --- In-process SQL profile -------------------------------------------------------------------


def profile_queries() -> list[str]:
    """Count the SQL statements of one node's attempt, in this process (no worker).

    Runs the first node of a two-node batch and of a two-node chain through
    ``executor.run_attempt`` directly, from claim to completion. The jobs it enqueues
    are deleted from Redis again.
    """
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from workflows import engine
    from workflows.definitions import versioning
    from workflows.models import NodeAttempt, NodeRun
    from workflows.runtime import dispatch, executor

    lines = []
    for label, chained in (("independent node", False), ("chain node (releases the next)", True)):
        version = versioning.load_definition(definition(2, chained), actor="bench").version
        run = engine.start_run(version, params={}, trigger="bench-profile")
        first = NodeRun.objects.filter(run=run).order_by("node_key").first()
        with CaptureQueriesContext(connection) as queries:
            executor.run_attempt(first.pk, first.attempt)
        statements = [query["sql"] for query in queries.captured_queries]
        writes = sum(
            1 for sql in statements if sql.split(None, 1)[0].upper() in ("INSERT", "UPDATE")
        )
        lines.append(
            f"  {label}: {len(statements)} SQL statements ({writes} INSERT/UPDATE) "
            "per attempt, from claim to completion"
        )
        lines.extend(f"    - {_shorten(sql)}" for sql in statements)
        for job_id in NodeAttempt.objects.filter(node_run__run=run).values_list(
            "rq_job_id", flat=True
        ):
            job = Job.fetch_many([job_id], dispatch.redis_connection(), JSONSerializer)[0]
            if job is not None:
                job.delete()
    return lines


def _shorten(sql: str, width: int = 110) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= width else sql[: width - 3] + "..."


# --- Report -----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _metrics(repeats: list[dict]) -> dict:
    """{metric: ([raw RQ value per repeat], [Keel value per repeat])}."""
    metrics = {"per-node cost": ([], []), "chain hop p50": ([], []), "chain hop p90": ([], [])}
    for result in repeats:
        for index, side in enumerate(("rq", "keel")):
            hops = result[side]["chain"].batch.hops()
            metrics["per-node cost"][index].append(result[side]["batch"].batch.per_node)
            metrics["chain hop p50"][index].append(statistics.median(hops))
            metrics["chain hop p90"][index].append(percentile(hops, 0.9))
    return metrics


def report(results: dict, stores: Stores, args) -> tuple[list[str], list[str]]:
    """The table and the phase breakdown as lines, and the targets missed.

    ``results`` maps a worker kind to one result per repeat; the table shows the median
    over repeats, the phases pool every node of every repeat.
    """
    import django
    import django_rq
    import rq

    header = ("worker", "metric", "raw RQ ms", "Keel ms", "Keel/RQ", "target")
    rows, missed = [], []
    for kind, repeats in results.items():
        metrics = [
            (name, statistics.median(rq_values), statistics.median(keel_values))
            for name, (rq_values, keel_values) in _metrics(repeats).items()
        ]
        for metric, rq_value, keel_value in metrics:
            ratio = keel_value / rq_value
            if metric == "chain hop p90":
                target = "(info)"
            elif ratio <= TARGET_RATIO:
                target = f"<= {TARGET_RATIO}x ✓"
            else:
                target = f"<= {TARGET_RATIO}x ✗"
                missed.append(f"{kind} {metric}: {ratio:.2f}x")
            rows.append((kind, metric, _ms(rq_value), _ms(keel_value), f"{ratio:.2f}x", target))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(row):
        cells = [
            str(cell).ljust(width) if i < 2 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [
        f"Keel vs raw RQ: {args.nodes} independent no-op nodes, a {args.chain}-node chain, "
        "one worker" + (f"; median of {args.repeat} repeats" if args.repeat > 1 else ""),
        f"Database: {stores.database_label}",
        f"Redis:    {stores.redis_label}",
        f"Versions: rq {rq.__version__}, django-rq {_version(django_rq)}, Django "
        f"{django.get_version()}, Python {platform.python_version()}; {os.cpu_count()} CPUs",
        "",
        line(header),
        line(["-" * width for width in widths]),
        *(line(row) for row in rows),
        "",
    ]
    out.append("Targets missed: " + "; ".join(missed) if missed else "All targets met.")
    out.append("")
    out.append(MEASURED.format(target=TARGET_RATIO))
    out.append("")
    out.append(
        "Where the time goes, median ms per node (RQ job hashes; for Keel also NodeAttempt):\n"
        "  rq start/end = around the job function; claim -> outcome = NodeAttempt.started_at "
        "to finished_at"
    )
    kind_width = max(len(kind) for kind in results)
    for kind, repeats in results.items():
        for shape in ("batch", "chain"):
            for side in ("rq", "keel"):
                pooled = {}
                for result in repeats:
                    for name, values in result[side][shape].phases.items():
                        pooled.setdefault(name, []).extend(values)
                parts = ", ".join(
                    f"{name} {_ms(statistics.median(values))}"
                    for name, values in pooled.items()
                    if values
                )
                label = "raw RQ" if side == "rq" else "Keel"
                out.append(f"  {kind:<{kind_width}} {shape:<5} {label:<6}  {parts}")
        enqueue = {
            side: statistics.median(result[side]["batch"].enqueue_seconds for result in repeats)
            for side in ("rq", "keel")
        }
        out.append(
            f"  {kind}: enqueueing {args.nodes} nodes took raw RQ {_ms(enqueue['rq'])} ms "
            f"(enqueue_many), Keel {_ms(enqueue['keel'])} ms (start_run)"
        )
    return out, missed


def _version(module) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.__name__.replace("_", "-"))
    except PackageNotFoundError:
        return "?"


# --- Main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description="Keel's per-node cost and chain hop latency against raw RQ.",
    )
    parser.add_argument("--nodes", type=int, default=1000, help="independent nodes (default 1000)")
    parser.add_argument("--chain", type=int, default=100, help="chain length (default 100)")
    parser.add_argument(
        "--worker",
        default="forking,simple",
        help="worker classes to compare, comma-separated: forking, simple (default both)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure everything N times and report medians (default 1; use 3+ on a busy machine)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also count the SQL statements of one Keel attempt, in-process",
    )
    args = parser.parse_args(argv)
    args.kinds = [kind.strip() for kind in args.worker.split(",") if kind.strip()]
    unknown = [kind for kind in args.kinds if kind not in WORKER_CLASSES]
    if unknown or not args.kinds:
        parser.error(f"--worker takes forking and/or simple, not {', '.join(unknown) or 'nothing'}")
    if args.nodes < 2 or args.chain < 2 or args.repeat < 1:
        parser.error("--nodes and --chain must be at least 2, --repeat at least 1")
    return args


def measure(stores: Stores, tmp: Path, kind: str, args) -> dict:
    """Both sides, both shapes, with one worker class; interleaved, so drift on a shared
    machine hits raw RQ and Keel alike."""
    result = {"rq": {}, "keel": {}}
    for shape, count in (("batch", args.nodes), ("chain", args.chain)):
        chained = shape == "chain"
        print(f"[{kind}] raw RQ: {count} jobs ({shape}) ...", flush=True)
        result["rq"][shape] = rq_batch(stores, tmp, kind, count, chained=chained)
        print(f"[{kind}] Keel: {count} nodes ({shape}) ...", flush=True)
        result["keel"][shape] = keel_batch(stores, tmp, kind, count, chained=chained)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stores = prepare_stores(stack, tmp)
        results = {kind: [] for kind in args.kinds}
        for repeat in range(args.repeat):
            for kind in args.kinds:
                started = time.monotonic()
                results[kind].append(measure(stores, tmp, kind, args))
                print(
                    f"[{kind}] repeat {repeat + 1}/{args.repeat} done in "
                    f"{time.monotonic() - started:.0f}s",
                    flush=True,
                )
        lines, _ = report(results, stores, args)
        if args.profile:
            lines += ["", "SQL per Keel attempt (in-process, executor.run_attempt):"]
            lines += profile_queries()
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
