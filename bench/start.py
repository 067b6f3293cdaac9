"""Starting a wide run against RQ's bulk enqueue: same Redis, same database.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
    REDIS_URL=redis://127.0.0.1:6379/7 .venv/bin/python -m bench.start [--nodes 1000]
                                                        [--repeat 5] [--profile]

Each repeat times, on an empty Redis database:

1. raw RQ: ``Queue.enqueue_many`` of ``--nodes`` no-op jobs made with ``Queue.prepare_data``
   (JSON serializer, Keel's job timeout and result TTLs);
2. Keel: ``engine.start_run`` of a ``--nodes``-node definition of independent ``keel.noop``
   nodes, loaded once through ``versioning.load_definition``: the run, its event, its node
   runs and their attempts, and the jobs sent after commit.

Both sides are timed after ``gc.freeze()``, as a gunicorn worker or the watchdog runs.
It prints the medians, the Keel/RQ ratio against the 2x target, and the SQL statements
and Redis round trips of one more start (counted apart: counting costs time).
``--profile`` adds cProfile's top functions of one start.

The database is a throwaway ``keel_start_<pid>`` on the PostgreSQL server of DATABASE_URL
(default postgres://postgres@127.0.0.1:5432/postgres; created, migrated, dropped); a
sqlite:// DATABASE_URL gives a temporary SQLite file instead. REDIS_URL must be a database with no keys at all (default redis://127.0.0.1:6379/7):
the bench refuses one that has any, and deletes only the keys it wrote after each repeat.
"""

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

# The throwaway database: created and dropped as bench/engine.py does.
from bench.engine import _create_postgres_database, _drop_postgres_database

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
TARGET_RATIO = 2.0
NOOP_FUNC = "bench.jobs.noop"
QUEUE = "default"
# As Keel's dispatch: the default node timeout and its result TTLs.
JOB_TIMEOUT = 30


# --- Stores -----------------------------------------------------------------------------------


def prepare_stores(
    stack: contextlib.ExitStack,
    tmp: Path,
    *,
    prefix: str = "keel_start",
    redis_url: str = DEFAULT_REDIS_URL,
    postgres_only: bool = False,
    keep: bool = False,
) -> str:
    """Point Django at a throwaway database and an empty Redis database; return a label."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["KEEL_VAR_DIR"] = str(tmp)
    os.environ["DEBUG"] = "0"
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.setdefault("REDIS_URL", redis_url)
    database_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    if urlsplit(database_url).scheme in ("postgres", "postgresql"):
        name = f"{prefix}_{os.getpid()}"
        os.environ["DATABASE_URL"] = _create_postgres_database(database_url, name)
        if not keep:
            stack.callback(_drop_postgres_database, database_url, name)
        label = f"PostgreSQL, throwaway database {name}"
    elif postgres_only:
        raise SystemExit(f"This bench needs PostgreSQL; DATABASE_URL is {database_url!r}.")
    else:
        os.environ["DATABASE_URL"] = f"sqlite:///{tmp / 'start.sqlite3'}"
        label = "SQLite, temporary file"

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)

    from workflows.runtime import dispatch

    redis = dispatch.redis_connection()
    if redis.dbsize():
        raise SystemExit(
            f"{dispatch.redacted_redis_url()} has keys; the bench needs an empty Redis "
            f"database of its own, e.g. REDIS_URL={redis_url}."
        )
    return (
        f"{label}; Redis {redis.info('server')['redis_version']} at {dispatch.redacted_redis_url()}"
    )


def delete_jobs(job_ids: list[str], queues: set[str]) -> None:
    """Delete the jobs the bench wrote, their queue entries, and the queue keys it made."""
    from workflows.runtime import dispatch

    redis = dispatch.redis_connection()
    with redis.pipeline(transaction=False) as pipe:
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            pipe.delete(*(f"rq:job:{job_id}" for job_id in chunk))
            for queue in queues:
                for job_id in chunk:
                    pipe.lrem(f"rq:queue:{queue}", 0, job_id)
        pipe.execute()
    # The queue lists and RQ's set of queue names did not exist before the repeat.
    for queue in queues:
        if not redis.llen(f"rq:queue:{queue}"):
            redis.srem("rq:queues", f"rq:queue:{queue}")
    if not redis.scard("rq:queues"):
        redis.delete("rq:queues")
    left = redis.dbsize()
    if left:
        raise SystemExit(f"{left} key(s) left in Redis after a repeat; something else uses it.")


# --- The two sides ----------------------------------------------------------------------------


def definition(count: int) -> str:
    lines = [f"name: Start of {count}", f"slug: start-{count}", "nodes:"]
    lines += [f"  n{index:05d}: {{type: keel.noop}}" for index in range(count)]
    return "\n".join(lines) + "\n"


def rq_enqueue_many(count: int, repeat: int) -> float:
    from rq import Queue

    from workflows.runtime import dispatch

    queue = dispatch.get_queue(QUEUE)
    ids = [f"bench-start-{os.getpid()}-{repeat}-{index:05d}" for index in range(count)]
    started = time.perf_counter()
    queue.enqueue_many(
        [
            Queue.prepare_data(
                NOOP_FUNC,
                args=(index,),
                timeout=JOB_TIMEOUT,
                job_id=job_id,
                result_ttl=dispatch.RESULT_TTL,
                failure_ttl=dispatch.FAILURE_TTL,
                description=f"bench job {index}",
            )
            for index, job_id in enumerate(ids)
        ]
    )
    seconds = time.perf_counter() - started
    _check_queued(ids, count, "raw RQ")
    delete_jobs(ids, {QUEUE})
    return seconds


def keel_start(version) -> tuple[float, object]:
    from workflows import engine

    started = time.perf_counter()
    run = engine.start_run(version, params={}, trigger="bench")
    seconds = time.perf_counter() - started
    _check_and_delete_keel_jobs(run)
    return seconds, run


def _check_and_delete_keel_jobs(run) -> None:
    from workflows.models import NodeAttempt

    attempts = list(NodeAttempt.objects.filter(node_run__run=run).values_list("rq_job_id", "queue"))
    ids = [job_id for job_id, _ in attempts]
    _check_queued(ids, len(run.version.spec["nodes"]), "Keel")
    delete_jobs(ids, {queue for _, queue in attempts})


def _check_queued(ids: list[str], count: int, what: str) -> None:
    from workflows.runtime import dispatch

    missing = dispatch.missing_jobs(ids)
    if len(ids) != count or missing:
        raise SystemExit(f"{what}: {len(ids)} job ids for {count} nodes, {len(missing)} missing")


def count_round_trips(version) -> tuple[int, int]:
    """SQL statements and Redis round trips of one start (one packed send = one trip)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from redis.connection import AbstractConnection

    from workflows import engine

    sends = []
    original = AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):
        sends.append(1)
        return original(self, command, check_health)

    AbstractConnection.send_packed_command = counted
    try:
        with CaptureQueriesContext(connection) as queries:
            run = engine.start_run(version, params={}, trigger="bench-count")
    finally:
        AbstractConnection.send_packed_command = original
    _check_and_delete_keel_jobs(run)
    return len(queries.captured_queries), len(sends)


def profile(version, top: int = 30) -> str:
    from workflows import engine

    profiler = cProfile.Profile()
    profiler.enable()
    run = engine.start_run(version, params={}, trigger="bench-profile")
    profiler.disable()
    _check_and_delete_keel_jobs(run)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --- Main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.start",
        description="Time engine.start_run of a wide run against RQ's enqueue_many.",
    )
    parser.add_argument("--nodes", type=int, default=1000, help="independent nodes (1000)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats, median reported (5)")
    parser.add_argument("--profile", action="store_true", help="print cProfile of one start")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.repeat < 1:
        parser.error("--nodes and --repeat must be at least 1")
    return args


def measure(nodes: int = 1000, repeat: int = 5, with_profile: bool = False) -> dict:
    """Medians of both sides (interleaved, so drift hits both), and one counted start.

    Needs Django set up on a migrated database and an empty Redis database (``main``
    does both; another bench may call this on its own stores).
    """
    from workflows.definitions import versioning

    version = versioning.load_definition(definition(nodes), actor="bench").version
    keel_start(version)  # warm-up: first queries, imports, prepared plans
    rq_enqueue_many(nodes, -1)
    # As gunicorn workers and the watchdog do at start (config/gunicorn.conf.py): what is built
    # so far stays out of later collections, so neither side pays for this process's
    # heap (in bench.scale a collection of it took ~60 ms inside one start).
    gc.collect()
    gc.freeze()
    rq_seconds, keel_seconds = [], []
    for index in range(repeat):
        rq_seconds.append(rq_enqueue_many(nodes, index))
        keel_seconds.append(keel_start(version)[0])
    statements, redis_trips = count_round_trips(version)
    return {
        "rq": statistics.median(rq_seconds),
        "keel": statistics.median(keel_seconds),
        "statements": statements,
        "redis_trips": redis_trips,
        "profile": profile(version) if with_profile else "",
    }


def report(result: dict, label: str, args) -> list[str]:
    ratio = result["keel"] / result["rq"]
    mark = "✓" if ratio <= TARGET_RATIO else "✗"
    rows = [
        ("what", "ms", "ratio"),
        (f"RQ enqueue_many, {args.nodes} jobs", f"{result['rq'] * 1000:.1f}", "1.00x"),
        (
            f"Keel start_run, {args.nodes} nodes",
            f"{result['keel'] * 1000:.1f}",
            f"{ratio:.2f}x (target <= {TARGET_RATIO}x {mark})",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [
        f"Starting a {args.nodes}-node run vs RQ enqueue_many; median of {args.repeat}",
        label,
        "",
    ]
    lines += [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}" for row in rows]
    lines += [
        "",
        f"One Keel start: {result['statements']} SQL statements, "
        f"{result['redis_trips']} Redis round trip(s)",
    ]
    if result["profile"]:
        lines += ["", result["profile"]]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="keel-start-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        label = prepare_stores(stack, tmp)
        result = measure(args.nodes, args.repeat, with_profile=args.profile)
        print("\n".join(report(result, label, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
