"""The runs list: filters, keyset pagination, and staying fast at 100 000 runs."""

import re
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from dashboard import selectors
from tests.web.conftest import CHAIN
from workflows.models import Run, Workflow, WorkflowVersion

pytestmark = pytest.mark.django_db


def listed(client, query: str = "") -> list[int]:
    page = client.get(f"/runs/{query}").content.decode()
    return [int(n) for n in re.findall(r'<td class="num"><a href="/runs/(\d+)/">', page)]


def cursor(page: str, rel: str) -> str | None:
    match = re.search(rf'rel="{rel}" href="\?([^"]+)"', page)
    return match.group(1).replace("&amp;", "&") if match else None


@pytest.fixture
def runs(start_run, make_version):
    """Runs of two workflows, two versions of one, in every state, at different ages."""
    make_version(CHAIN)
    other = {**CHAIN, "slug": "other", "name": "Other"}
    made = []
    for _ in range(6):
        made.append(start_run(CHAIN))
        made.append(start_run(other))
    made.append(start_run(make_version({**CHAIN, "description": "v2"})))
    Run.objects.filter(pk__in=[made[0].pk, made[1].pk]).update(status="failed")
    Run.objects.filter(pk=made[2].pk).update(
        status="succeeded", created_at=timezone.now() - timedelta(days=3)
    )
    return made


def test_filters_by_workflow_status_version_and_time(operator_client, runs):
    all_ids = sorted((run.pk for run in runs), reverse=True)
    assert listed(operator_client) == all_ids
    assert listed(operator_client, "?workflow=other") == [
        run.pk for run in reversed(runs) if run.workflow.slug == "other"
    ]
    assert listed(operator_client, "?status=failed") == [runs[1].pk, runs[0].pk]
    assert listed(operator_client, "?workflow=chain&status=failed") == [runs[0].pk]
    assert listed(operator_client, "?workflow=chain&version=2") == [runs[-1].pk]
    assert runs[2].pk not in listed(operator_client, "?range=24h")
    assert listed(operator_client, "?range=7d") == all_ids
    three_days_ago = (timezone.now() - timedelta(days=3, hours=1)).strftime("%Y-%m-%dT%H:%M")
    two_days_ago = (timezone.now() - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    assert listed(operator_client, f"?created_from={three_days_ago}&created_to={two_days_ago}") == [
        runs[2].pk
    ]


def test_bad_filter_values_say_so_and_show_all_runs(operator_client, runs):
    page = operator_client.get("/runs/?status=exploded&version=x")
    assert page.status_code == 200
    assert "Showing all runs instead" in page.content.decode()


def test_keyset_pages_cover_every_run_once_both_ways(operator_client, start_run, monkeypatch):
    monkeypatch.setattr(selectors, "RUNS_PAGE_SIZE", 7)
    made = sorted((start_run(CHAIN).pk for _ in range(30)), reverse=True)

    seen, query, pages = [], "", []
    while query is not None:
        page = operator_client.get(f"/runs/?{query}").content.decode()
        ids = [int(n) for n in re.findall(r'<td class="num"><a href="/runs/(\d+)/">', page)]
        seen += ids
        pages.append(page)
        query = cursor(page, "next")
    assert seen == made
    assert len(pages) == 5

    back, query = [], cursor(pages[-1], "prev")
    while query is not None:
        page = operator_client.get(f"/runs/?{query}").content.decode()
        back = [int(n) for n in re.findall(r'<td class="num"><a href="/runs/(\d+)/">', page)] + back
        query = cursor(page, "prev")
    assert back + seen[-2:] == made  # every page but the last, walked back to the newest


def test_pagination_keeps_the_filters(operator_client, start_run, monkeypatch):
    monkeypatch.setattr(selectors, "RUNS_PAGE_SIZE", 2)
    for _ in range(5):
        start_run(CHAIN)
    page = operator_client.get("/runs/?workflow=chain&status=running").content.decode()
    assert "workflow=chain" in cursor(page, "next") and "status=running" in cursor(page, "next")


def test_runs_list_queries_stay_constant_as_data_grows(operator_client, start_run):
    start_run(CHAIN)
    urls = ["/runs/", "/runs/?workflow=chain&status=running&range=24h", "/runs/?before=999999"]

    def counts():
        result = []
        for url in urls:
            with CaptureQueriesContext(connection) as captured:
                assert operator_client.get(url).status_code == 200
            result.append(len(captured))
        return result

    few = counts()
    for _ in range(60):
        start_run(CHAIN)
    assert counts() == few


# --- 100 000 runs -----------------------------------------------------------------------------

HUNDRED_THOUSAND = 100_000

# One INSERT … SELECT over a counter: 100 000 rows in about a second, where bulk_create
# takes half a minute on SQLite. Runs are spread over 30 days, over every version of
# every workflow, with a realistic mix of states.
INSERT_RUNS = """
    WITH {counter}, versions(k, version_id, workflow_id) AS (VALUES {versions})
    INSERT INTO workflows_run (workflow_id, version_id, status, params, trigger, priority,
        reason, created_at, updated_at, started_at, finished_at, deadline, pools)
    SELECT versions.workflow_id, versions.version_id,
        CASE WHEN n %% 50 < 3 THEN 'failed' WHEN n %% 50 = 3 THEN 'cancelled'
             WHEN n %% 50 = 4 THEN 'running' ELSE 'succeeded' END,
        '{{}}', 'bench', 'default', '', {created}, {now}, {created}, NULL, NULL, '[]'
    FROM counter JOIN versions ON versions.k = n %% {version_count}
"""
DIALECT = {
    "sqlite": {
        "counter": "RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter "
        "WHERE n < %(count)s)",
        "created": "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || ((%(count)s - n) * 26) "
        "|| ' seconds')",
        "now": "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')",
    },
    "postgresql": {
        "counter": "counter(n) AS (SELECT generate_series(1, %(count)s))",
        "created": "now() - make_interval(secs => (%(count)s - n) * 26)",
        "now": "now()",
    },
}


def insert_runs(count: int) -> None:
    versions = list(WorkflowVersion.objects.order_by("id").values_list("id", "workflow_id"))
    sql = INSERT_RUNS.format(
        versions=", ".join(f"({k}, {v}, {w})" for k, (v, w) in enumerate(versions)),
        version_count=len(versions),
        **DIALECT[connection.vendor],
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, {"count": count})
        cursor.execute("ANALYZE workflows_run" if connection.vendor == "postgresql" else "ANALYZE")


def test_runs_list_stays_fast_at_100_000_runs(operator_client, capsys):
    """Every filter and a deep page run the same queries at 100 000 runs as at 150, the
    database part stays within tens of milliseconds, and nothing counts the whole table.

    (The rest of a page's time is rendering its 50 rows, which does not grow with the
    table.)
    """
    for index in range(5):
        workflow = Workflow.objects.create(slug=f"bench-{index}", name=f"Bench {index}")
        for number in range(1, 4):
            WorkflowVersion.objects.create(
                workflow=workflow, number=number, spec={}, source="", checksum="x", created_by="t"
            )
    urls = [
        "/runs/",
        "/runs/?status=failed",
        "/runs/?status=cancelled",
        "/runs/?workflow=bench-2",
        "/runs/?workflow=bench-2&status=failed",
        "/runs/?workflow=bench-2&version=3",
        "/runs/?range=24h",
        "/runs/?range=7d&status=running",
        "/runs/?created_from=2000-01-01T00:00&created_to=2000-01-02T00:00",
        "/runs/?before=10001",
    ]

    def measure() -> dict[str, tuple[int, float, float, list[str]]]:
        result = {}
        for url in urls:
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = operator_client.get(url)
                took = time.perf_counter() - started
            assert response.status_code == 200, url
            database = sum(float(q["time"]) for q in captured)
            result[url] = (len(captured), took, database, [q["sql"] for q in captured])
        return result

    insert_runs(150)  # enough for every filter to match something, as at 100 000
    small = measure()
    Run.objects.all().delete()
    insert_runs(HUNDRED_THOUSAND)
    assert Run.objects.count() == HUNDRED_THOUSAND
    measure()  # warm the caches, as a page people use is
    full = measure()

    with capsys.disabled():
        print(f"\nruns list at {HUNDRED_THOUSAND} runs on {connection.vendor} (total / database):")
        for url, (count, took, database, _) in full.items():
            print(f"  {took * 1000:6.1f} ms / {database * 1000:5.1f} ms  {count:2d} queries  {url}")
    for url, (count, took, database, sqls) in full.items():
        assert count == small[url][0], url
        assert database < 0.25, f"{url}: its queries took {database:.3f}s"
        assert took < 2.0, f"{url} took {took:.3f}s"
        for sql in sqls:
            if "COUNT(" in sql.upper() and "workflows_run" in sql:
                assert "LIMIT" in sql.upper(), f"unbounded count on {url}: {sql}"
    page = operator_client.get("/runs/").content.decode()
    assert "More than 10000 runs match" in page
