"""Run search and log search at 100 000 runs, 1 000 000 node runs, attempts and log lines.

Filled with one INSERT … SELECT per table (a few seconds each) on whichever database the
tests use; each search is timed through the page or the API it serves, after a warm-up,
and must stay within tens of milliseconds of database time. Slow: `-m "not slow"` skips it.
"""

import re
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from workflows.models import LogLine, NodeAttempt, NodeRun, Run, Workflow, WorkflowVersion

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

RUNS = 100_000
NODES_PER_RUN = 10
WORKFLOWS = 5
# Every 50th run failed at its node n7, with an error message of its own.
FAILED_EVERY = 50

SQL = {
    "sqlite": {
        "counter": "WITH RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter "
        "WHERE n < %(count)s)",
        "created": "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || ((%(count)s - n) * 26) "
        "|| ' seconds')",
        "plus": "strftime('%%Y-%%m-%%d %%H:%%M:%%f', {moment}, '+' || ({seconds}) || ' seconds')",
        "now": "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')",
        "concat": "{a} || {b}",
    },
    "postgresql": {
        "counter": "WITH counter(n) AS (SELECT generate_series(1, %(count)s))",
        "created": "now() - make_interval(secs => (%(count)s - n) * 26)",
        "plus": "{moment} + make_interval(secs => {seconds})",
        "now": "now()",
        "concat": "{a} || {b}",
    },
}


def fill(count: int) -> None:
    """``count`` runs of WORKFLOWS workflows over 30 days, NODES_PER_RUN nodes each with one
    attempt and one log line (INFO, or ERROR for the failed node)."""
    sql = SQL[connection.vendor]
    versions = []
    for index in range(WORKFLOWS):
        workflow = Workflow.objects.create(slug=f"bench-{index}", name=f"Bench {index}")
        versions.append(
            WorkflowVersion.objects.create(
                workflow=workflow, number=1, spec={}, source="", checksum="x", created_by="t"
            )
        )
    pairs = ", ".join(f"({k}, {v.pk}, {v.workflow_id})" for k, v in enumerate(versions))
    slots = ", ".join(f"({n})" for n in range(NODES_PER_RUN))
    failed = f"r.id %% {FAILED_EVERY} = 0"
    statements = [
        f"""{sql["counter"]}, versions(k, version_id, workflow_id) AS (VALUES {pairs})
        INSERT INTO workflows_run (workflow_id, version_id, status, params, trigger, priority,
            reason, created_at, updated_at, started_at, finished_at, deadline, pools)
        SELECT versions.workflow_id, versions.version_id,
            CASE WHEN n %% {FAILED_EVERY} = 0 THEN 'failed' ELSE 'succeeded' END,
            '{{}}', 'bench', 'default',
            CASE WHEN n %% {FAILED_EVERY} = 0 THEN 'node n7 failed' ELSE '' END,
            {sql["created"]}, {sql["now"]}, {sql["created"]}, {sql["created"]}, NULL, '[]'
        FROM counter JOIN versions ON versions.k = n %% {len(versions)}""",
        f"""WITH slots(slot) AS (VALUES {slots})
        INSERT INTO workflows_noderun (run_id, node_key, node_type, status, attempt,
            max_attempts, attempts_base, queue, pool, timeout_seconds, params, upstream,
            downstream, retry_policy, pending_upstreams, reason, created_at, updated_at)
        SELECT r.id, {sql["concat"].format(a="'n'", b="slot")}, 'keel.noop',
            CASE WHEN {failed} AND slot = 7 THEN 'failed' ELSE 'succeeded' END,
            1, 1, 0, 'default', '', 30, '{{}}', '[]', '[]', '{{}}', 0, '',
            r.created_at, r.created_at
        FROM workflows_run r CROSS JOIN slots ORDER BY r.id, slot""",
        f"""INSERT INTO workflows_nodeattempt (node_run_id, number, status, rq_job_id, queue,
            worker, host, created_at, updated_at, started_at, finished_at, error_type,
            error_message, traceback, resource_samples)
        SELECT nr.id, 1, nr.status, '', 'default', 'w', 'h', nr.created_at, nr.created_at,
            nr.created_at, nr.created_at,
            CASE nr.status WHEN 'failed' THEN 'ValueError' ELSE '' END,
            CASE nr.status WHEN 'failed' THEN
                {sql["concat"].format(a="'bad row in batch b'", b="nr.run_id")} ELSE '' END,
            '', '[]'
        FROM workflows_noderun nr ORDER BY nr.id""",
        f"""INSERT INTO workflows_logline (attempt_id, seq, at, level, message)
        SELECT a.id, 1, {sql["plus"].format(moment="a.created_at", seconds="a.id %% 10")},
            CASE a.status WHEN 'failed' THEN 'ERROR' ELSE 'INFO' END,
            CASE a.status WHEN 'failed' THEN
                {sql["concat"].format(a="'could not parse batch b'", b="a.id")}
            ELSE {sql["concat"].format(a="'processed batch b'", b="a.id")} END
        FROM workflows_nodeattempt a ORDER BY a.id""",
    ]
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement, {"count": count})
        cursor.execute("ANALYZE")


def measure(client, urls: list[str]) -> dict[str, tuple[int, float, float, list[str]]]:
    """(queries, total seconds, database seconds, SQL) of each URL, the best of three."""
    result = {}
    for url in urls:
        best = None
        for _ in range(3):
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = client.get(url)
                took = time.perf_counter() - started
            assert response.status_code == 200, (url, response.content[:500])
            database = sum(float(q["time"]) for q in captured)
            if best is None or database < best[2]:
                best = (len(captured), took, database, [q["sql"] for q in captured])
        result[url] = best
    return result


def test_searches_stay_fast_at_100_000_runs_and_a_million_log_lines(operator_client, capsys):
    """Every search reads an index or what its window holds, never a whole table: the
    database part stays within a few hundred milliseconds at the worst (a workflow and node
    filter over 7 days; a text no line has, over 7 days), tens of milliseconds otherwise,
    and every count stops at its cap."""
    began = time.perf_counter()
    fill(RUNS)
    filled = time.perf_counter() - began
    assert Run.objects.count() == RUNS
    assert NodeRun.objects.count() == RUNS * NODES_PER_RUN
    assert NodeAttempt.objects.count() == RUNS * NODES_PER_RUN
    assert LogLine.objects.count() == RUNS * NODES_PER_RUN
    some_run = Run.objects.order_by("id")[RUNS // 2].pk
    failed_run = Run.objects.filter(status="failed").order_by("id")[500].pk

    urls = [
        f"/runs/?q={some_run}",
        "/runs/?q=bench-3",
        "/runs/?q=valueerror",
        f"/runs/?q=batch+b{failed_run}",
        "/runs/?q=no-such-thing",
        "/runs/?q=no-such-thing&status=failed",
        "/api/v1/runs?q=no-such-thing",
        "/api/v1/runs?q=valueerror",
        "/logs/",
        "/logs/?q=could+not+parse",
        "/logs/?level=ERROR",
        "/logs/?q=no-such-thing",
        "/logs/?workflow=bench-3&node=n7",
        "/logs/?workflow=bench-3&node=n7&window=7d",
        "/logs/?q=no-such-thing&window=7d",
        "/logs/?q=batch&window=all",
        "/logs/?level=ERROR&window=all",
        f"/logs/?run={failed_run}&window=all",
        "/logs/?since=2000-01-01T10:00&until=2000-01-01T11:00",
        "/api/v1/logs?q=could+not+parse",
        "/api/v1/logs/counts?level=error",
    ]
    measure(operator_client, urls[:3])  # warm the caches, as a page people use is
    timings = measure(operator_client, urls)
    with capsys.disabled():
        print(f"\nsearch on {connection.vendor}, filled in {filled:.0f}s (total / database):")
        for url, (count, took, database, _) in timings.items():
            print(f"  {took * 1000:7.1f} ms / {database * 1000:6.1f} ms  {count:2d} queries  {url}")
    for url, (_, took, database, sqls) in timings.items():
        assert database < 1.0, f"{url}: its queries took {database:.3f}s"
        assert took < 3.0, f"{url} took {took:.3f}s"
        for sql in sqls:
            if "COUNT(" in sql.upper() and ("workflows_run" in sql or "workflows_logline" in sql):
                assert "LIMIT" in sql.upper(), f"unbounded count on {url}: {sql}"
    assert listed_ids(operator_client, f"/runs/?q={some_run}") == [some_run]
    page = operator_client.get("/logs/?q=batch&window=all").content.decode()
    assert "<strong>More than 10000</strong> lines match" in page


def listed_ids(client, url: str) -> list[int]:
    page = client.get(url).content.decode()
    return [int(n) for n in re.findall(r'<td class="num"><a href="/runs/(\d+)/">', page)]
