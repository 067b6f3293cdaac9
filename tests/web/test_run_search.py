"""Run search in the runs list and the API: a number is a run id; text matches the workflow's
slug or name, the run's reason, or an attempt's error type or message (any case)."""

import re

import pytest

from tests.web.conftest import CHAIN, work
from workflows.models import Run

pytestmark = pytest.mark.django_db

OTHER = {**CHAIN, "slug": "nightly-export", "name": "Nightly Export"}


def listed(client, query: str) -> list[int]:
    page = client.get(f"/runs/{query}")
    assert page.status_code == 200
    return [
        int(n)
        for n in re.findall(r'<td class="num"><a href="/runs/(\d+)/">', page.content.decode())
    ]


@pytest.fixture
def runs(start_run):
    """chain: one failed at b (ValueError: bad row 501), one cancelled with a reason, one
    running; nightly-export: two running."""
    failed = start_run(CHAIN)
    work(failed, "a")
    work(failed, "b", fail="ValueError", message="bad row 501 in orders.csv")
    cancelled = start_run(CHAIN)
    Run.objects.filter(pk=cancelled.pk).update(
        status=Run.Status.CANCELLED, reason="Stopped: the warehouse is in maintenance"
    )
    running = start_run(CHAIN)
    exports = [start_run(OTHER), start_run(OTHER)]
    return {"failed": failed, "cancelled": cancelled, "running": running, "exports": exports}


def test_a_number_finds_the_run_with_that_id(operator_client, runs):
    run = runs["running"]
    assert listed(operator_client, f"?q={run.pk}") == [run.pk]
    assert listed(operator_client, f"?q=%23{run.pk}") == [run.pk]
    assert listed(operator_client, f"?q=+{run.pk}+") == [run.pk]
    assert listed(operator_client, "?q=999999") == []
    assert listed(operator_client, "?q=99999999999999999999999") == []  # no overflow


def test_text_finds_the_workflow_by_slug_or_name(operator_client, runs):
    exports = sorted((run.pk for run in runs["exports"]), reverse=True)
    assert listed(operator_client, "?q=NIGHTLY") == exports
    assert listed(operator_client, "?q=export") == exports
    assert listed(operator_client, "?q=Nightly+Exp") == exports


def test_text_finds_the_error_of_any_attempt_and_the_runs_reason(operator_client, runs):
    failed, cancelled = runs["failed"].pk, runs["cancelled"].pk
    assert listed(operator_client, "?q=valueerror") == [failed]
    assert listed(operator_client, "?q=ROW+501+in") == [failed]
    assert listed(operator_client, "?q=maintenance") == [cancelled]
    assert listed(operator_client, "?q=no+such+words") == []


def test_search_combines_with_the_other_filters_and_paging_keeps_it(operator_client, runs):
    assert listed(operator_client, "?q=chain&status=cancelled") == [runs["cancelled"].pk]
    page = operator_client.get("/runs/?q=Nightly").content.decode()
    assert 'value="Nightly"' in page and "2 runs match the filters" in page
    assert 'role="search"' in page


def test_the_api_searches_runs_the_same_way(operator_client, runs):
    def ids(url):
        answer = operator_client.get(url)
        assert answer.status_code == 200, answer.content
        return [run["id"] for run in answer.json()["results"]]

    failed = runs["failed"].pk
    assert ids("/api/v1/runs?q=bad+row") == [failed]
    assert ids(f"/api/v1/runs?q={failed}") == [failed]
    assert ids("/api/v1/runs?q=nightly") == sorted((r.pk for r in runs["exports"]), reverse=True)
    assert ids("/api/v1/workflows/chain/runs?q=maintenance") == [runs["cancelled"].pk]
    assert ids("/api/v1/workflows/nightly-export/runs?q=maintenance") == []
    answer = operator_client.get("/api/v1/runs?q=" + "x" * 201)
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "q"
