"""The graph on the run and workflow pages (a 50-shard fan-out folds into one group that
opens by a link) and the workflow page's grid of recent runs by nodes, in a fixed number
of queries."""

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from dashboard import run_grid
from tests.web.conftest import CHAIN, work
from tests.web.test_dashboard import queries
from workflows import operations
from workflows.models import Workflow

pytestmark = pytest.mark.django_db


def fan_out(shards: int = 50, slug: str = "fan") -> dict:
    keys = [f"shard_{i:02d}" for i in range(shards)]
    return {
        "name": "Fan",
        "slug": slug,
        "nodes": {
            **{key: {"type": "test.effect", "params": {"value": 1}} for key in keys},
            "combine": {"type": "test.effect", "params": {"value": 2}, "after": keys},
        },
    }


@pytest.fixture
def fan_run(start_run):
    """48 shards succeeded, shard_17 and shard_33 failed: the run failed, combine never ran."""
    run = start_run(fan_out())
    for i in range(50):
        if i not in (17, 33):
            work(run, f"shard_{i:02d}")
    work(run, "shard_17", fail="ValueError", message="bad shard")
    work(run, "shard_33", fail="ValueError", message="bad shard")
    run.refresh_from_db()
    assert run.status == "failed"
    return run


def links_in(page: str, start: str, end: str = "</g>") -> list[str]:
    """hrefs of the links inside the part of the page from ``start`` to ``end``."""
    part = page[page.index(start) :]
    part = part[: part.index(end, part.index("dag-toggle"))]
    return re.findall(r'href="([^"]*)"', part)


# --- Run page ---------------------------------------------------------------------------------


def test_run_page_folds_the_shards_into_one_group_with_counts(operator_client, fan_run):
    page = operator_client.get(f"/runs/{fan_run.pk}/?node=combine").content.decode()

    assert page.count('class="dag-group s-failed') == 1
    assert ">shard_00…49<" in page
    assert '<tspan class="t-failed">2 ✕</tspan>' in page
    assert '<tspan class="t-succeeded">48 ✓</tspan>' in page
    assert "2 failed, 48 succeeded" in page  # the title says it in words
    # Folded: the failed shards are links, the others are not drawn; the fan-in is.
    assert links_in(page, 'data-group="shard_00"') == [
        "?node=combine&amp;expand=shard_00#graph",
        "?node=shard_17",
        "?node=shard_33",
        "?node=combine&amp;expand=shard_00#graph",
    ]
    assert 'data-node="shard_05"' not in page
    assert 'data-node="combine"' in page
    assert 'data-from="shard_00" data-to="combine"' in page


def test_the_timeline_folds_as_the_graph_does(operator_client, fan_run):
    def timeline(query: str) -> str:
        page = operator_client.get(f"/runs/{fan_run.pk}/{query}").content.decode()
        return page[page.index('class="timeline"') : page.index("<h2>History")]

    folded = timeline("")
    assert folded.count('class="tl-row"') == 2  # the 50 shards on one row, combine
    assert ">shard_00…49 (50)</a>" in folded and "expand=shard_00" in folded
    assert folded.count('class="tl-bar s-succeeded"') == 48
    assert folded.count('class="tl-bar s-failed"') == 2
    opened = timeline("?expand=shard_00")
    assert opened.count('class="tl-row"') == 51


def test_run_page_opens_the_group_and_its_member_links_keep_it_open(operator_client, fan_run):
    page = operator_client.get(
        f"/runs/{fan_run.pk}/?node=shard_17&expand=shard_00"
    ).content.decode()

    assert 'class="dag-group s-failed open selected"' in page
    assert page.count('class="dag-member ') == 50
    assert 'href="?node=shard_05&amp;expand=shard_00" class="dag-link" data-node="shard_05"' in page
    assert 'class="dag-member s-failed selected"' in page  # shard_17, open in the panel
    assert 'href="?node=shard_17#graph" class="dag-toggle"' in page  # folds, same node open
    assert "▾ fold into one box" in page


def test_polling_keeps_the_group_open(operator_client, start_run):
    run = start_run(fan_out())
    page = operator_client.get(f"/runs/{run.pk}/?expand=shard_00").content.decode()
    assert f'hx-get="/runs/{run.pk}/live/?expand=shard_00' in page
    live = operator_client.get(f"/runs/{run.pk}/live/?expand=shard_00").content.decode()
    assert live.count('class="dag-member s-queued') == 50


def test_run_page_with_the_group_open_keeps_its_query_count(operator_client, fan_run):
    folded = queries(operator_client, f"/runs/{fan_run.pk}/?node=shard_17")
    assert queries(operator_client, f"/runs/{fan_run.pk}/?node=shard_17&expand=shard_00") == folded


def test_an_unknown_or_hostile_expand_is_ignored_and_escaped(operator_client, fan_run):
    page = operator_client.get(
        f"/runs/{fan_run.pk}/", {"expand": ['"><script>alert(1)</script>', "nope"]}
    ).content.decode()
    assert "<script>alert(1)" not in page
    assert 'class="dag-group s-failed open' not in page


# --- Workflow page: graph ---------------------------------------------------------------------


def test_workflow_page_folds_the_definition_and_opens_it_by_link(operator_client, make_version):
    make_version(fan_out())
    page = operator_client.get("/workflows/fan/").content.decode()
    assert page.count('class="dag-group s-definition') == 1
    assert "□ test.effect" in page
    assert 'href="?expand=shard_00#graph" class="dag-toggle"' in page

    page = operator_client.get("/workflows/fan/?window=30d&expand=shard_00").content.decode()
    assert page.count('class="dag-member s-definition') == 50
    assert 'data-node="shard_05"' not in page  # a definition's nodes open nothing
    assert 'href="?window=30d#graph" class="dag-toggle"' in page


def test_the_workflow_page_fits_a_wide_graph_in_its_box(operator_client, make_version):
    make_version(fan_out())
    page = operator_client.get("/workflows/fan/").content.decode()
    width = int(re.search(r'<svg class="dag"[^>]* width="(\d+)"', page).group(1))
    assert width < 400  # 50 shards and a fan-in: two columns, not six
    assert f"width: max(100%, {-(-width * 3 // 4)}px); max-width: {width}px" in page


# --- Workflow page: grid ----------------------------------------------------------------------


def test_grid_shows_recent_runs_newest_first_by_node_with_state_in_glyph_and_words(
    operator_client, start_run, make_version
):
    first = start_run(CHAIN)
    for key in "abc":
        work(first, key)
    second = start_run(CHAIN)
    work(second, "a")
    work(second, "b", fail="ValueError", message="bad row")

    page = operator_client.get("/workflows/chain/").content.decode()
    grid = page[page.index('id="grid"') : page.index("</section>", page.index('id="grid"'))]

    runs = re.findall(r'<th scope="col" class="rm-run"><a href="/runs/(\d+)/"', grid)
    assert runs == [str(second.pk), str(first.pk)]
    rows = re.findall(r'<th scope="row" class="rm-node"[^>]*>([^<]+)<', grid)
    assert rows == ["a", "b", "c"]
    assert (
        f'<td class="rm-cell s-failed"><a href="/runs/{second.pk}/?node=b" '
        f'title="Run #{second.pk} · b: failed" aria-label="Run #{second.pk} · b: failed">✕</a>'
    ) in grid
    assert f'href="/runs/{first.pk}/?node=c" title="Run #{first.pk} · c: succeeded"' in grid
    assert f"Run #{second.pk} · c: pending" in grid
    assert "✕</span> failed" in grid and "✓</span> succeeded" in grid  # the legend


def test_grid_folds_the_shards_into_one_row_with_counts_that_open_the_first_failed(
    operator_client, fan_run
):
    page = operator_client.get("/workflows/fan/").content.decode()
    grid = page[page.index('id="grid"') : page.index("</section>", page.index('id="grid"'))]

    assert re.findall(r'class="rm-node"[^>]*>([^<]+)<', grid) == ["Node", "shard_00…49 ", "combine"]
    assert "<small>\N{MULTIPLICATION SIGN}50</small>" in grid
    cell = re.search(r'<td class="rm-cell s-failed"><a href="([^"]+)" title="([^"]+)"', grid)
    assert cell.group(1) == f"/runs/{fan_run.pk}/?node=shard_17&amp;expand=shard_00"
    assert cell.group(2) == f"Run #{fan_run.pk} · shard_00…49: 2 failed, 48 succeeded"
    assert "<span>2✕</span><span>48✓</span>" in grid


def test_grid_marks_nodes_a_runs_version_did_not_have(operator_client, start_run):
    old = start_run(CHAIN)
    start_run({**CHAIN, "nodes": {**CHAIN["nodes"], "d": {"type": "test.effect", "after": ["c"]}}})
    page = operator_client.get("/workflows/chain/").content.decode()
    assert f"Run #{old.pk} (v1) has no node d." in page


def test_grid_reads_two_queries_however_many_runs_and_nodes(start_run, make_version):
    small = start_run(CHAIN)
    workflow = Workflow.objects.get(slug="chain")
    with CaptureQueriesContext(connection) as few:
        grid = run_grid.run_grid(workflow, small.version)
    assert len(grid.runs) == 1 and len(grid.rows) == 3

    wide = make_version(fan_out(shards=12, slug="wide"))
    for _ in range(run_grid.GRID_RUNS + 3):
        start_run(wide)
    with CaptureQueriesContext(connection) as many:
        grid = run_grid.run_grid(wide.workflow, wide)
    assert len(grid.runs) == run_grid.GRID_RUNS and len(grid.rows) == 2
    assert len(few) == len(many) == 2


def test_workflow_page_with_the_grid_keeps_a_constant_number_of_queries(
    operator_client, make_version, start_run
):
    start_run(CHAIN)
    few = queries(operator_client, "/workflows/chain/")
    wide = make_version(fan_out(shards=12, slug="chain"))  # v2 of chain: 13 nodes
    for _ in range(run_grid.GRID_RUNS + 3):
        run = start_run(wide)
    operations.cancel_run(run.pk, actor="test", reason="enough")
    assert queries(operator_client, "/workflows/chain/") == few
    assert queries(operator_client, "/workflows/chain/?expand=shard_03") == few
