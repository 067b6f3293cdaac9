"""What the dashboard shows: the overview, workflows and versions, and the run page with
its graph, timeline, node panel, history and live updates. Pages keep a constant number
of queries however much data there is."""

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnostics.models import Finding
from tests.web.conftest import CHAIN, nodes, work
from workflows import operations
from workflows.models import LogLine, NodeAttempt, Run

pytestmark = pytest.mark.django_db


def queries(client, url: str, status: int = 200) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == status, url
    return len(captured)


def finding(run=None, node_run=None, *, code="heartbeat_stale", resolved=False, title="Stuck"):
    now = timezone.now()
    return Finding.objects.create(
        code=code,
        subject=f"node_run:{node_run.pk if node_run else 0}:{code}:{Finding.objects.count()}",
        run=run,
        node_run=node_run,
        title=title,
        suggestion="Retry the node.",
        first_seen=now - timedelta(seconds=30),
        last_seen=now,
        resolved_at=now if resolved else None,
    )


# --- Overview ---------------------------------------------------------------------------------


def test_overview_counts_the_last_24_hours_and_the_failure_rate(
    operator_client, failed_run, succeeded_run, start_run
):
    old = start_run(CHAIN)
    Run.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    start_run(CHAIN)  # running now

    page = operator_client.get("/").content.decode()

    stat = dict(
        re.findall(r'stat-label">([^<]+)</span><span class="stat-value">([^<]+)</span>', page)
    )
    assert stat["Runs · 24 h"] == "3"
    assert stat["✕ Failed"] == "1" and stat["✓ Succeeded"] == "1"
    assert stat["Failure rate"] == "50.0%"
    assert stat["▶ Runs running"] == "2"  # the old one is running too, just not in the window
    assert stat["◔ Nodes queued"] == "2"


def test_overview_lists_recent_failures_with_their_reason_and_actions(operator_client, failed_run):
    page = operator_client.get("/").content.decode()
    assert f"#{failed_run.pk}</strong> chain" in page
    assert "bad row 501" in page
    assert f"/runs/{failed_run.pk}/resume/preview/" in page
    assert f"/runs/{failed_run.pk}/retry/preview/?node=b" in page


def test_overview_shows_open_findings_in_the_stuck_nodes_slot(operator_client, start_run):
    run = start_run(CHAIN)
    finding(run, nodes(run)["a"], title="Node a has no heartbeat")
    finding(run, nodes(run)["b"], title="Long gone", resolved=True)

    page = operator_client.get("/").content.decode()

    assert "Node a has no heartbeat" in page and "Retry the node." in page
    assert f"/runs/{run.pk}/?node=a" in page
    assert "Long gone" not in page


def test_overview_queries_stay_constant_as_data_grows(operator_client, start_run):
    work(start_run(CHAIN), "a", fail="ValueError")
    finding(start_run(CHAIN))
    few = queries(operator_client, "/")
    for _ in range(12):
        run = start_run(CHAIN)
        work(run, "a", fail="ValueError")
        finding(run, nodes(run)["a"])
        start_run(CHAIN)
    assert queries(operator_client, "/") == few


# --- Workflows and versions -------------------------------------------------------------------


def test_workflow_list_shows_latest_version_last_run_and_window_counts(
    operator_client, failed_run, make_version
):
    make_version({**CHAIN, "description": "v2"})
    page = operator_client.get("/workflows/").content.decode()
    assert ">v2<" in page
    assert f'href="/runs/{failed_run.pk}/">#{failed_run.pk}</a>' in page
    assert "?workflow=chain&amp;status=failed&amp;range=24h" in page


def test_workflow_pages_keep_a_constant_number_of_queries(operator_client, make_version, start_run):
    start_run(CHAIN)
    few_list = queries(operator_client, "/workflows/")
    few_detail = queries(operator_client, "/workflows/chain/")
    for number in range(8):
        make_version({**CHAIN, "slug": f"other-{number}", "name": f"Other {number}"})
        make_version({**CHAIN, "description": f"version {number}"})
        start_run(CHAIN)
    assert queries(operator_client, "/workflows/") == few_list
    assert queries(operator_client, "/workflows/chain/") == few_detail


def test_workflow_page_draws_the_definition_graph_and_lists_versions(operator_client, make_version):
    make_version(CHAIN)
    make_version({**CHAIN, "description": "second"})
    page = operator_client.get("/workflows/chain/").content.decode()
    assert page.count('class="dag-node s-definition') == 3
    assert "test.effect" in page
    assert "v2" in page and "v1" in page
    assert "/workflows/chain/diff/?to=2" in page


def test_version_diff_is_readable_and_names_changed_nodes(operator_client, make_version):
    make_version(CHAIN)
    changed = {
        **CHAIN,
        "nodes": {
            "a": {"type": "test.effect", "params": {"value": 10}},
            "b": CHAIN["nodes"]["b"],
            "d": {"type": "keel.noop", "after": ["b"]},
        },
    }
    make_version(changed)

    page = operator_client.get("/workflows/chain/diff/?from=1&to=2").content.decode()

    assert "v1 → v2" in page
    assert re.search(r'<tr class="added">.*value: 10', page)
    assert re.search(r'<tr class="removed">.*value: 1\b', page)
    assert 'nodes added: <code class="added">d</code>' in page
    assert '<code class="removed">c</code>' in page
    assert "changed: <code>a</code>" in page


def test_diff_of_a_version_with_itself_says_identical(operator_client, make_version):
    make_version(CHAIN)
    page = operator_client.get("/workflows/chain/diff/?from=1&to=1").content.decode()
    assert "identical" in page


def test_version_diff_keeps_a_constant_number_of_queries(operator_client, make_version):
    make_version(CHAIN)
    make_version({**CHAIN, "description": "second"})
    few = queries(operator_client, "/workflows/chain/diff/")
    for number in range(10):
        wider = {f"n{i}": {"type": "keel.noop"} for i in range(number * 5)}
        make_version({**CHAIN, "nodes": {**CHAIN["nodes"], **wider}})
    assert queries(operator_client, "/workflows/chain/diff/") == few
    assert queries(operator_client, "/workflows/chain/diff/?from=1&to=12") == few


# --- The run page -----------------------------------------------------------------------------


def test_run_page_draws_every_node_with_its_state_in_colour_and_words(operator_client, failed_run):
    page = operator_client.get(f"/runs/{failed_run.pk}/").content.decode()
    svg = page[page.index("<svg") : page.index("</svg>")]
    states = dict(re.findall(r'data-node="(\w+)">\s*<g class="dag-node s-(\w+)', svg))
    assert states == {"a": "succeeded", "b": "failed", "c": "pending"}
    assert "✓ succeeded" in svg and "✕ failed" in svg and "○ pending" in svg
    assert 'href="?node=b"' in svg
    assert svg.count('<path d="M') == 2  # a→b, b→c


def test_run_page_opens_the_failed_node_with_attempts_logs_checkpoints_and_data(
    operator_client, failed_run
):
    page = operator_client.get(f"/runs/{failed_run.pk}/").content.decode()
    panel = page[page.index('id="node"') :]
    assert "<code>b</code>" in panel
    assert "w-1" in panel and "host-1" in panel and "pid 4242" in panel
    assert "<strong>ValueError</strong>: bad row 501" in panel
    assert "Traceback: bad row 501" in panel
    assert "&quot;offset&quot;: 500" in panel  # the progress checkpoint
    assert "rollback/preview/?to_checkpoint=" in panel  # the run is finished: roll back
    assert "&quot;a&quot;: 1" in panel  # the input from a
    assert "&quot;value&quot;: 2" in panel  # b's params


def test_node_panel_shows_output_inputs_and_history_of_operator_actions(
    operator_client, failed_run, operator
):
    operations.skip_node(
        failed_run.pk, "b", actor=operations.Actor.for_user(operator), reason="not needed today"
    )
    page = operator_client.get(f"/runs/{failed_run.pk}/?node=a").content.decode()
    assert "&quot;a&quot;: 1" in page  # a's output
    history = page[page.index("<h2>History") :]
    assert "olga" in history and "not needed today" in history
    assert "skip: run failed → running" in history


def test_logs_are_paged_the_last_page_first(operator_client, start_run):
    run = start_run(CHAIN)
    work(run, "a", logs=[f"line number {n}" for n in range(1, 451)])

    latest = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    first = operator_client.get(f"/runs/{run.pk}/?node=a&log_page=1").content.decode()

    assert "450 lines" in latest and "page 3 of 3" in latest
    assert "line number 450<" in latest and "line number 401<" in latest
    assert "line number 400<" not in latest
    assert "line number 1<" in first and "line number 200<" in first
    assert "line number 201<" not in first and "page 1 of 3" in first


def test_each_attempt_has_its_own_log(operator_client, failed_run, operator):
    operations.retry_node(failed_run.pk, "b", actor=operations.Actor.for_user(operator), reason="x")
    work(failed_run, "b", logs=["second attempt says hi"])

    latest = operator_client.get(f"/runs/{failed_run.pk}/?node=b").content.decode()
    first = operator_client.get(f"/runs/{failed_run.pk}/?node=b&attempt=1").content.decode()

    assert "second attempt says hi" in latest
    assert "second attempt says hi" not in first and "This attempt logged nothing." in first


def test_timeline_has_a_bar_per_attempt(operator_client, failed_run):
    page = operator_client.get(f"/runs/{failed_run.pk}/").content.decode()
    timeline = page[page.index('class="timeline"') : page.index("<h2>History")]
    assert timeline.count('class="tl-bar s-succeeded"') == 1
    assert timeline.count('class="tl-bar s-failed"') == 1
    assert "not run" in timeline  # c


def test_run_page_shows_open_findings_about_the_run(operator_client, start_run):
    run = start_run(CHAIN)
    finding(run, nodes(run)["a"], title="Heartbeat stale for a")
    page = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    # Once, in the summary's headline: the node panel does not repeat it.
    summary = page[page.index('aria-label="Summary"') : page.index('class="panel graph-panel"')]
    assert "but: Heartbeat stale for a." in summary
    assert page.count("Heartbeat stale for a") == 1


def test_run_page_queries_stay_constant_as_the_run_grows(operator_client, start_run, make_version):
    small = start_run(CHAIN)
    work(small, "a", logs=["x"])
    work(small, "b", fail="ValueError", checkpoint={"n": 1})
    big_definition = {
        "name": "Big",
        "slug": "big",
        "nodes": {
            f"n{i}": {"type": "test.effect", **({"after": [f"n{i - 1}"]} if i else {})}
            for i in range(30)
        },
    }
    big = start_run(big_definition)
    for i in range(29):
        work(big, f"n{i}", logs=[f"log {j}" for j in range(50)], checkpoint={"i": i})
    work(big, "n29", fail="ValueError", logs=["boom"] * 300, checkpoint={"i": 29})
    for key in ("b", "n29"):
        finding(Run.objects.get(nodes__node_key=key), None, code=f"c-{key}")

    for suffix in ("", "?node=a", "?node=b&log_page=1"):
        small_count = queries(operator_client, f"/runs/{small.pk}/{suffix}")
        # n0 and a have no upstream, n29 and b one (its input: one query).
        big_suffix = suffix.replace("node=a", "node=n0").replace("node=b", "node=n29")
        assert queries(operator_client, f"/runs/{big.pk}/{big_suffix}") == small_count, suffix
    assert queries(operator_client, f"/runs/{small.pk}/live/", 286) == queries(
        operator_client, f"/runs/{big.pk}/live/", 286
    )


# --- Live updates -----------------------------------------------------------------------------


def test_a_running_run_polls_its_live_partial(operator_client, start_run):
    run = start_run(CHAIN)
    page = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    assert f'hx-get="/runs/{run.pk}/live/?node=a"' in page
    assert 'hx-trigger="every 2s"' in page and 'hx-swap="outerHTML"' in page

    partial = operator_client.get(f"/runs/{run.pk}/live/?node=a")
    assert partial.status_code == 200
    body = partial.content.decode()
    assert body.lstrip().startswith('<div id="run-live"') and "<html" not in body
    assert 'hx-trigger="every 2s"' in body


def test_the_live_partial_answers_286_when_the_run_is_finished(operator_client, start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key)

    partial = operator_client.get(f"/runs/{run.pk}/live/")
    page = operator_client.get(f"/runs/{run.pk}/").content.decode()

    assert partial.status_code == 286
    assert "✓ succeeded" in partial.content.decode()
    assert "hx-trigger" not in partial.content.decode()
    assert "hx-trigger" not in page


def test_the_page_sends_the_csrf_token_to_htmx(operator_client, start_run):
    run = start_run(CHAIN)
    page = operator_client.get(f"/runs/{run.pk}/").content.decode()
    assert re.search(
        r"<body hx-headers='\{&quot;X-CSRFToken&quot;: &quot;\w+&quot;\}'", page
    ) or re.search(r"<body hx-headers='\{\"X-CSRFToken\": \"\w+\"\}'", page)


def test_attempt_rows_and_resource_figures(operator_client, start_run):
    run = start_run(CHAIN)
    work(run, "a")
    NodeAttempt.objects.filter(node_run__run=run).update(cpu_percent=42.4, rss_bytes=50 * 1024**2)
    page = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    assert "42%" in page and "50.0\xa0MB" in page
    assert LogLine.objects.count() == 0


def test_the_live_partial_stops_polling_when_signed_out(client, start_run):
    run = start_run(CHAIN)
    response = client.get(f"/runs/{run.pk}/live/")
    assert response.status_code == 286
    assert "You were signed out" in response.content.decode()
    assert f"?next=/runs/{run.pk}/" in response.content.decode()


def test_run_lists_leave_each_version_definition_in_the_database(admin_client, start_run):
    """Lists show a run's version by number; a wide workflow's definition is ~100 KB of
    JSON, and decoding it for every listed run made the admin's run list slow."""
    run = start_run(CHAIN)
    spec_column = re.compile(r'"workflows_workflowversion"\."(spec|source)"')
    urls = ["/", "/runs/", f"/workflows/{run.workflow.slug}/", "/admin/workflows/run/"]
    urls.append("/api/v1/runs")
    for url in urls:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(url).status_code == 200, url
        with_runs = [
            q["sql"] for q in captured.captured_queries if 'FROM "workflows_run"' in q["sql"]
        ]
        assert with_runs, url
        assert [sql for sql in with_runs if spec_column.search(sql)] == [], url
