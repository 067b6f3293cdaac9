"""Keel at a million node runs: pages, API lists, /metrics, the watchdog tick, a wide start.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
    REDIS_URL=redis://127.0.0.1:6379/8 .venv/bin/python -m bench.scale [--runs 100000]
        [--nodes-per-run 10] [--running 10000] [--repeat 20] [--start-nodes 1000]

1. Fills a throwaway PostgreSQL database (``keel_scale_<pid>``, created, migrated,
   dropped) with SQL (``generate_series``): ``--runs`` runs of 20 workflows over 90 days
   (4 % failed, 1 % cancelled), ``--nodes-per-run`` node runs each with their attempts,
   one event per run, a history of resolved findings, and ``--running`` running nodes
   (the newest runs) whose workers are registered in an empty Redis database the way RQ
   registers them (worker keys, started registries, job hashes), all heartbeating.
2. Starts ``--start-nodes``-node runs against RQ's ``enqueue_many`` (bench.start) on that
   full database.
3. Times watchdog ticks with every running node healthy, then in a mass incident: every
   running node's heartbeat stops at once (their workers still beat to RQ), so each gets
   a finding: the tick that opens them, the ticks that keep them (nothing changed), and
   the tick that resolves them when heartbeats come back.
4. Times every dashboard page, API list and admin list (server time through Django's test
   client, queries counted apart) and a /metrics scrape, while the incident's findings
   are open (the findings pages at their largest).

It prints one table with p50/p95, query counts and each target (< 100 ms per page and
API list, < 100 ms for a healthy tick, < 1 s for a tick with 10 000 open findings,
a start <= 2x RQ). REDIS_URL must name an empty Redis database; the bench deletes it
after (FLUSHDB of that database only).
"""

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench import start

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"
WORKFLOWS = 20
DAYS = 90
HOST = "bench-host"  # not this host: the watchdog reads RQ, not the process table
PAGE_TARGET_MS = 100
TICK_TARGET_MS = 100
INCIDENT_TICK_TARGET_MS = 1000


# --- Filling the database ---------------------------------------------------------------------


def definition(index: int, nodes: int) -> str:
    lines = [f"name: Scale {index:02d}", f"slug: scale-{index:02d}", "nodes:"]
    lines += [f"  part_{n}: {{type: keel.noop, timeout: 3600}}" for n in range(nodes)]
    return "\n".join(lines) + "\n"


def fill_database(runs: int, nodes: int, running: int, now: datetime) -> dict:
    """Rows by SQL; returns what was made and how long each table took."""
    from django.db import connection

    from workflows.definitions import versioning
    from workflows.models import WorkflowVersion

    versions = [
        versioning.load_definition(definition(i, nodes), actor="bench").version
        for i in range(WORKFLOWS)
    ]
    running_runs = -(-running // nodes)  # the newest runs, all their nodes running
    spec = WorkflowVersion.objects.get(pk=versions[0].pk).spec["nodes"]
    keys = list(spec)[:nodes]
    timings = {}
    params = {"now": now, "runs": runs, "live": runs - running_runs, "span": f"{DAYS} days"}
    with connection.cursor() as cursor:

        def timed(table: str, sql: str, args: dict | None = None) -> None:
            began = time.perf_counter()
            cursor.execute(sql, {**params, **(args or {})})
            timings[table] = time.perf_counter() - began

        workflow_rows = ", ".join(f"({i}, {v.workflow_id}, {v.pk})" for i, v in enumerate(versions))
        # Run i was created i/runs of the way through the window; the newest are running.
        # Every 31st run that succeeded had failed first and was resumed.
        timed(
            "runs",
            f"""
            INSERT INTO workflows_run (id, workflow_id, version_id, status, params, trigger,
                priority, reason, created_at, updated_at, started_at, finished_at, pools,
                first_failed_at)
            SELECT i, w.workflow_id, w.version_id, s.status, '{{}}', 'bench', 'default',
                CASE s.status WHEN 'failed' THEN 'node part_{nodes - 1} failed' ELSE '' END,
                t.at, t.at, t.at + interval '1 second',
                CASE WHEN s.status IN ('running') THEN NULL
                     ELSE t.at + interval '240 seconds' END,
                '[]',
                CASE WHEN s.status = 'failed' THEN t.at + interval '240 seconds'
                     WHEN s.status = 'succeeded' AND i %% 31 = 0
                         THEN t.at + interval '120 seconds'
                     END
            FROM generate_series(1, %(runs)s) AS i
            JOIN (VALUES {workflow_rows}) AS w(slot, workflow_id, version_id)
                ON w.slot = i %% {WORKFLOWS}
            CROSS JOIN LATERAL (
                SELECT %(now)s::timestamptz - (%(runs)s - i + 1) * %(span)s::interval
                    / %(runs)s - interval '2 minutes' AS at) AS t
            CROSS JOIN LATERAL (
                SELECT CASE WHEN i > %(live)s THEN 'running'
                            WHEN i %% 23 = 0 THEN 'failed'
                            WHEN i %% 97 = 5 THEN 'cancelled'
                            ELSE 'succeeded' END AS status) AS s
            """,
        )
        node_rows = ", ".join(f"({n}, '{key}')" for n, key in enumerate(keys))
        # Finished nodes took 100-219 s; running ones started 10 s ago and heartbeat now.
        timed(
            "node runs",
            f"""
            INSERT INTO workflows_noderun (run_id, node_key, node_type, status, attempt,
                attempts_base, max_attempts, queue, pool, timeout_seconds, params, upstream,
                downstream, retry_policy, pending_upstreams, heartbeat_at, output, reason,
                created_at, updated_at, queued_at, started_at, finished_at)
            SELECT r.id, n.key, 'keel.noop', s.status, s.attempt, 0, 1, 'default', '', 3600,
                '{{}}', '[]', '[]', '{{}}', 0,
                CASE s.status WHEN 'running' THEN %(now)s::timestamptz END,
                CASE s.status WHEN 'succeeded' THEN '{{"rows": 1}}'::jsonb END,
                CASE s.status WHEN 'failed' THEN 'ValueError: bad row' ELSE '' END,
                r.created_at, r.created_at, r.created_at,
                CASE s.status WHEN 'running' THEN %(now)s::timestamptz - interval '10 seconds'
                              WHEN 'cancelled' THEN NULL ELSE r.started_at END,
                CASE WHEN s.status IN ('running', 'cancelled') THEN NULL
                     ELSE r.started_at + (100 + (r.id * 7 + n.slot * 13) %% 120)
                          * interval '1 second' END
            FROM workflows_run r
            CROSS JOIN (VALUES {node_rows}) AS n(slot, key)
            CROSS JOIN LATERAL (
                SELECT CASE r.status WHEN 'failed' THEN
                                CASE WHEN n.slot = {nodes - 1} THEN 'failed' ELSE 'succeeded' END
                            ELSE r.status END AS status,
                       CASE r.status WHEN 'cancelled' THEN 0 ELSE 1 END AS attempt) AS s
            ORDER BY r.id, n.slot
            """,
        )
        # One attempt per node that ran; a running one names its own worker.
        timed(
            "attempts",
            f"""
            INSERT INTO workflows_nodeattempt (node_run_id, number, status, rq_job_id, queue,
                worker, pid, host, created_at, updated_at, started_at, finished_at,
                error_type, error_message, traceback, resource_samples)
            SELECT nr.id, 1, nr.status, 'keel-' || nr.id || '-1', 'default',
                CASE nr.status WHEN 'running' THEN 'bench-worker-' || nr.id
                               ELSE 'bench-worker-' || nr.id %% 50 END,
                1000 + nr.id %% 30000, '{HOST}', nr.created_at, nr.created_at,
                nr.started_at, nr.finished_at,
                CASE nr.status WHEN 'failed' THEN 'ValueError' ELSE '' END,
                CASE nr.status WHEN 'failed' THEN 'bad row' ELSE '' END, '', '[]'
            FROM workflows_noderun nr
            WHERE nr.attempt = 1
            ORDER BY nr.id
            """,
        )
        timed(
            "events",
            """
            INSERT INTO workflows_runevent (run_id, at, kind, actor, reason, before, after)
            SELECT id, created_at, 'transition', 'bench', '', '{"status": "pending"}',
                jsonb_build_object('status', status)
            FROM workflows_run ORDER BY id
            """,
        )
        # Past incidents: a resolved heartbeat_stale finding on every 50th node run.
        timed(
            "findings",
            """
            INSERT INTO diagnostics_finding (code, severity, subject, queue, worker, title,
                evidence, suggestion, action, first_seen, last_seen, resolved_at,
                repair, node_run_id, run_id, digest, began_at)
            SELECT 'heartbeat_stale', 'warning', 'node_run:' || nr.id, 'default',
                'bench-worker-' || nr.id %% 50, 'Node ' || nr.node_key || ' went quiet',
                jsonb_build_object('since', to_char(nr.started_at AT TIME ZONE 'UTC',
                    'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')),
                'Check the worker.', '{}', nr.started_at + interval '20 seconds',
                nr.started_at + interval '50 seconds', nr.started_at + interval '60 seconds',
                '', nr.id, nr.run_id, '', nr.started_at
            FROM workflows_noderun nr
            WHERE nr.id %% 50 = 0 AND nr.status IN ('succeeded', 'failed')
            ORDER BY nr.id
            """,
        )
        for table in ("workflows_run", "workflows_noderun", "workflows_nodeattempt"):
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        began = time.perf_counter()
        cursor.execute("ANALYZE")
        timings["analyze"] = time.perf_counter() - began
        cursor.execute(
            "SELECT (SELECT count(*) FROM workflows_run), (SELECT count(*) FROM "
            "workflows_noderun), (SELECT count(*) FROM workflows_noderun WHERE status = "
            "'running'), (SELECT count(*) FROM diagnostics_finding)"
        )
        made = dict(
            zip(("runs", "node runs", "running", "findings"), cursor.fetchone(), strict=True)
        )
    return {"made": made, "timings": timings, "versions": versions}


def fill_redis(now: datetime) -> int:
    """Register each running node's worker, job and started-registry entry as RQ does."""
    from rq.utils import utcformat

    from workflows.models import NodeAttempt, NodeRun
    from workflows.runtime import dispatch

    redis = dispatch.redis_connection()
    rows = list(
        NodeAttempt.objects.filter(node_run__status=NodeRun.Status.RUNNING).values_list(
            "worker", "pid", "rq_job_id"
        )
    )
    beat = utcformat(now)
    expires = now.timestamp() + 3600
    with redis.pipeline(transaction=False) as pipe:
        for start_at in range(0, len(rows), 1000):
            for worker, pid, job_id in rows[start_at : start_at + 1000]:
                key = f"rq:worker:{worker}"
                pipe.sadd("rq:workers", key)
                pipe.hset(
                    key,
                    mapping={
                        "queues": "default",
                        "hostname": HOST,
                        "pid": pid,
                        "state": "busy",
                        "current_job": job_id,
                        "last_heartbeat": beat,
                        "birth": beat,
                    },
                )
                pipe.hset(
                    f"rq:job:{job_id}",
                    mapping={"status": "started", "worker_name": worker, "started_at": beat},
                )
                pipe.zadd("rq:wip:default", {f"{job_id}:bench": expires})
            pipe.execute()
    return len(rows)


def set_running(started: datetime, beat: datetime) -> None:
    """Every running node (and its attempt) started at ``started`` and last heartbeat at
    ``beat``, in the database."""
    from workflows.models import NodeAttempt, NodeRun

    NodeRun.objects.filter(status=NodeRun.Status.RUNNING).update(
        heartbeat_at=beat, started_at=started
    )
    NodeAttempt.objects.filter(status=NodeAttempt.Status.RUNNING).update(started_at=started)


def beat_rq() -> None:
    """Every worker heartbeats to RQ now: in this bench RQ's heartbeats never stop."""
    from rq.utils import utcformat

    from workflows.runtime import dispatch

    redis = dispatch.redis_connection()
    beat = utcformat(datetime.now(UTC))
    workers = list(redis.smembers("rq:workers"))
    with redis.pipeline(transaction=False) as pipe:
        for key in workers:
            pipe.hset(key, "last_heartbeat", beat)
        pipe.execute()


def beat_healthy() -> None:
    """Before each healthy tick (untimed): every node and worker beats now."""
    from django.utils import timezone

    now = timezone.now()
    set_running(now - timedelta(seconds=20), now)
    beat_rq()


def settle_started_runs(slug: str) -> int | None:
    """bench.start's runs (their jobs deleted) as finished, so the watchdog does not re-send
    them; returns one of them, the 1 000-node run page to time."""
    from django.db import connection

    from workflows.models import Run

    ids = list(
        Run.objects.filter(workflow__slug=slug, status=Run.Status.RUNNING)
        .order_by("id")
        .values_list("id", flat=True)
    )
    if not ids:
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE workflows_nodeattempt SET status = 'succeeded', started_at = now(), "
            "finished_at = now() WHERE node_run_id IN (SELECT id FROM workflows_noderun "
            "WHERE run_id = ANY(%s))",
            [ids],
        )
        cursor.execute(
            "UPDATE workflows_noderun SET status = 'succeeded', attempt = 1, "
            "started_at = now(), finished_at = now() WHERE run_id = ANY(%s)",
            [ids],
        )
        cursor.execute(
            "UPDATE workflows_run SET status = 'succeeded', started_at = now(), "
            "finished_at = now() WHERE id = ANY(%s)",
            [ids],
        )
    return ids[-1]


# --- Timing -----------------------------------------------------------------------------------


def analyze() -> None:
    """What autovacuum does after this many new rows (a server may run without it: this
    machine's does), so that plans see the incident's findings."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def time_tick(repeat: int, before=beat_rq) -> dict:
    from diagnostics import watchdog

    seconds, reports = [], []
    for _ in range(repeat):
        before()
        began = time.perf_counter()
        report = watchdog.tick()
        seconds.append(time.perf_counter() - began)
        reports.append(report)
    failed = [str(r) for r in reports if r.failed or not r.acted]
    if failed:
        raise SystemExit("A tick failed:\n" + "\n".join(failed))
    return {"seconds": seconds, "last": reports[-1]}


def profile_tick(top: int = 40) -> str:
    import cProfile
    import io
    import pstats

    from diagnostics import watchdog

    profiler = cProfile.Profile()
    profiler.enable()
    watchdog.tick()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def count_queries(func) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        func()
    return len(queries.captured_queries)


_last_rq_beat = [0.0]


def keep_workers_beating() -> None:
    """Workers beat to RQ all along: renew their beats (untimed) every 5 s, well inside the
    stale threshold, or the pages would see 10 000 frozen workers."""
    if time.monotonic() - _last_rq_beat[0] > 5:
        beat_rq()
        _last_rq_beat[0] = time.monotonic()


def time_get(client, url: str, repeat: int) -> dict:
    keep_workers_beating()
    response = client.get(url)  # warm-up, and a check that it answers
    if response.status_code != 200:
        raise SystemExit(f"GET {url} answered {response.status_code}")
    seconds = []
    for _ in range(repeat):
        keep_workers_beating()
        began = time.perf_counter()
        client.get(url)
        seconds.append(time.perf_counter() - began)
    keep_workers_beating()
    return {"seconds": seconds, "queries": count_queries(lambda: client.get(url))}


def page_urls(sample: dict) -> list[tuple[str, str]]:
    slug, run, live, wide = sample["slug"], sample["run"], sample["live"], sample["wide"]
    urls = [
        ("page", "/"),
        ("page", "/runs/"),
        ("page", f"/runs/?workflow={slug}"),
        ("page", "/runs/?status=failed"),
        ("page", f"/runs/{run}/"),
        ("page", f"/runs/{live}/"),
        ("page", "/workflows/"),
        ("page", f"/workflows/{slug}/"),
        ("page", f"/workflows/{slug}/?window=24h"),
        ("page", f"/workflows/{slug}/?window=30d"),
        ("page", f"/workflows/{slug}/?window=90d"),
        ("page", "/runs/?q=failed"),
        ("page", f"/runs/?q={run}"),
        ("page", "/logs/"),
        ("page", "/findings/"),
        ("page", "/system/"),
        ("page", "/workers/"),
        ("api", "/api/v1/runs"),
        ("api", "/api/v1/runs?status=failed"),
        ("api", f"/api/v1/runs?workflow={slug}"),
        ("api", f"/api/v1/runs/{run}"),
        ("api", f"/api/v1/runs/{run}/events"),
        ("api", "/api/v1/workflows"),
        ("api", f"/api/v1/workflows/{slug}"),
        ("api", f"/api/v1/workflows/{slug}/runs"),
        ("api", "/api/v1/findings"),
        ("api", "/api/v1/findings?state=recent"),
        ("api", "/api/v1/runs?q=failed"),
        ("api", "/api/v1/logs"),
        ("api", "/api/v1/workers"),
        ("admin", "/admin/workflows/run/"),
        ("admin", "/admin/workflows/noderun/"),
        ("admin", "/admin/diagnostics/finding/"),
        ("scrape", "/metrics"),
    ]
    if wide:
        urls.insert(6, ("page", f"/runs/{wide}/"))
        urls.insert(23, ("api", f"/api/v1/runs/{wide}"))
    return urls


# --- Main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description="Pages, API lists, /metrics, watchdog ticks and a wide start at scale.",
    )
    parser.add_argument("--runs", type=int, default=100_000, help="runs (100000)")
    parser.add_argument("--nodes-per-run", type=int, default=10, help="nodes per run (10)")
    parser.add_argument("--running", type=int, default=10_000, help="running nodes (10000)")
    parser.add_argument("--repeat", type=int, default=20, help="timings per row (20)")
    parser.add_argument("--start-nodes", type=int, default=1000, help="wide start (1000)")
    parser.add_argument(
        "--skip",
        default="",
        help="parts to leave out, comma-separated: start, ticks, pages (default: none)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the database and Redis keys (to look into)"
    )
    parser.add_argument(
        "--profile-tick", action="store_true", help="print cProfile of one incident tick"
    )
    args = parser.parse_args(argv)
    if min(args.runs, args.nodes_per_run, args.repeat, args.start_nodes) < 1:
        parser.error("every count must be at least 1")
    args.skip = {part for part in args.skip.split(",") if part}
    if args.skip - {"start", "ticks", "pages"}:
        parser.error("--skip takes start, ticks and pages")
    if args.running > args.runs * args.nodes_per_run // 2:
        parser.error("--running must be at most half the node runs")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="keel-scale-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        os.environ.setdefault("ALLOWED_HOSTS", "testserver")
        label = start.prepare_stores(
            stack,
            tmp,
            prefix="keel_scale",
            redis_url=DEFAULT_REDIS_URL,
            postgres_only=True,
            keep=args.keep,
        )
        from workflows.runtime import dispatch

        if not args.keep:
            stack.callback(lambda: dispatch.redis_connection().flushdb())
        print(label, flush=True)
        print(run_bench(args), flush=True)
    return 0


def run_bench(args) -> str:
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.utils import timezone

    from diagnostics.detectors import durations
    from diagnostics.models import Finding
    from workflows.models import Run

    now = timezone.now()
    began = time.perf_counter()
    filled = fill_database(args.runs, args.nodes_per_run, args.running, now)
    fill_seconds = time.perf_counter() - began
    made = filled["made"]
    print(
        f"Filled in {fill_seconds:.0f} s: "
        + ", ".join(f"{count:,} {what}" for what, count in made.items())
        + " ("
        + ", ".join(f"{table} {s:.1f} s" for table, s in filled["timings"].items())
        + ")",
        flush=True,
    )
    rows = []

    wide = None
    if "start" not in args.skip:
        # The wide start, against RQ, on the full database (Redis still empty, as it needs).
        started = start.measure(args.start_nodes, repeat=args.repeat)
        ratio = started["keel"] / started["rq"]
        rows.append(
            (
                "start",
                f"RQ enqueue_many, {args.start_nodes} jobs",
                started["rq"],
                None,
                None,
                "",
                "",
            )
        )
        rows.append(
            (
                "start",
                f"Keel start_run, {args.start_nodes} nodes",
                started["keel"],
                None,
                None,
                started["statements"],
                f"{ratio:.2f}x RQ (target <= {start.TARGET_RATIO}x) "
                + ("✓" if ratio <= start.TARGET_RATIO else "✗"),
            )
        )
        wide = settle_started_runs(f"start-{args.start_nodes}")
        analyze()

    registered = fill_redis(timezone.now())
    print(f"Registered {registered:,} busy workers in Redis", flush=True)

    if "ticks" not in args.skip:
        # As `manage.py watchdog` does at start: what is built so far stays out of later
        # collections.
        gc.collect()
        gc.freeze()
        # Healthy: every running node beats; nothing is wrong. Timed once the watchdog has
        # read every running node's duration history (HISTORY_REFRESH per tick after a
        # start; then each again HISTORY_KEEP_SECONDS later: 10 of 300 ticks, ~50 ms more).
        warm_up = -(-WORKFLOWS * args.nodes_per_run // durations.HISTORY_REFRESH)
        time_tick(warm_up, before=beat_healthy)
        healthy = time_tick(args.repeat, before=beat_healthy)
        _tick_row(rows, "tick, all healthy", healthy, TICK_TARGET_MS)
        open_now = Finding.objects.filter(resolved_at__isnull=True).count()
        if args.profile_tick:
            beat_healthy()
            print(profile_tick(), flush=True)

        # The mass incident: every running node's heartbeat stopped 20 s ago (3 beats make
        # it stale) while their workers still beat to RQ; a finding per node.
        now = timezone.now()
        set_running(now - timedelta(seconds=25), now - timedelta(seconds=20))
        first = time_tick(1)
        analyze()
        opened = Finding.objects.filter(resolved_at__isnull=True).count()
        _tick_row(rows, f"tick opening {opened - open_now:,} findings", first, None)
        steady = time_tick(args.repeat)
        _tick_row(
            rows, f"tick, {opened:,} open findings, unchanged", steady, INCIDENT_TICK_TARGET_MS
        )
        if args.profile_tick:
            print(profile_tick(), flush=True)

    if "pages" not in args.skip:
        # As a gunicorn worker does at start (config/gunicorn.conf.py, post_worker_init):
        # what this process built so far stays out of later collections, so a page's time
        # is the page's, not a full collection of the bench's own objects.
        gc.collect()
        gc.freeze()
        # Pages with the incident's findings open.
        user = get_user_model().objects.create_superuser("bench", "bench@example.com", "bench")
        client = Client()
        client.force_login(user)
        sample = {
            "slug": "scale-01",
            "run": Run.objects.filter(workflow__slug="scale-01", status=Run.Status.FAILED)
            .order_by("-id")
            .values_list("id", flat=True)
            .first(),
            "live": Run.objects.filter(status=Run.Status.RUNNING).order_by("id").first().pk,
            "wide": wide,
        }
        for kind, url in page_urls(sample):
            timed = time_get(client, url, args.repeat)
            p95 = percentile(timed["seconds"], 0.95) * 1000
            mark = "✓" if p95 < PAGE_TARGET_MS else "✗"
            rows.append(
                (
                    kind,
                    url,
                    statistics.median(timed["seconds"]),
                    percentile(timed["seconds"], 0.95),
                    max(timed["seconds"]),
                    timed["queries"],
                    f"p95 < {PAGE_TARGET_MS} ms {mark}",
                )
            )

    if "ticks" not in args.skip:
        # Heartbeats come back: the tick that resolves the incident.
        resolved = time_tick(1, before=beat_healthy)
        _tick_row(
            rows, f"tick resolving {len(resolved['last'].resolved):,} findings", resolved, None
        )
    header = (
        f"{made['runs']:,} runs, {made['node runs']:,} node runs, {made['running']:,} running, "
        f"{args.repeat} timings per row (server time through Django's test client)"
    )
    return header + "\n\n" + table(rows)


def _tick_row(rows: list, what: str, timed: dict, target_ms: float | None) -> None:
    seconds = timed["seconds"]
    p95 = percentile(seconds, 0.95)
    verdict = ""
    if target_ms is not None:
        verdict = f"p95 < {target_ms:g} ms " + ("✓" if p95 * 1000 < target_ms else "✗")
    rows.append(
        (
            "watchdog",
            what,
            statistics.median(seconds),
            p95 if len(seconds) > 1 else None,
            max(seconds) if len(seconds) > 1 else None,
            "",
            verdict,
        )
    )


def table(rows: list[tuple]) -> str:
    def ms(value) -> str:
        return "" if value is None else f"{value * 1000:.1f}"

    lines = [("kind", "what", "p50 ms", "p95 ms", "max ms", "queries", "target")]
    lines += [(k, w, ms(p50), ms(p95), ms(top), str(q), t) for k, w, p50, p95, top, q, t in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    return "\n".join(
        f"{k:<{widths[0]}}  {w:<{widths[1]}}  {p50:>{widths[2]}}  {p95:>{widths[3]}}  "
        f"{top:>{widths[4]}}  {q:>{widths[5]}}  {t}"
        for k, w, p50, p95, top, q, t in lines
    )


if __name__ == "__main__":
    sys.exit(main())
