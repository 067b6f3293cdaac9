"""Reading through the API: workflows, runs (filtered, paged), nodes, attempts, logs, history."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from diagnostics.models import Finding
from tests.api.conftest import CHAIN, nodes, work
from workflows.models import Checkpoint, LogLine, NodeAttempt, Run, RunEvent, Workflow

pytestmark = pytest.mark.django_db

OTHER = {"name": "Other", "nodes": {"x": {"type": "keel.noop"}}}


def all_pages(api, path, params=None) -> list[dict]:
    """Follow the next links; every page must be a 200."""
    results, url = [], f"/api/v1/{path}"
    response = api.get(url, params)
    while True:
        assert response.status_code == 200, response.content
        body = response.json()
        results += body["results"]
        if not body["next"]:
            return results
        assert body["next"].startswith("http://testserver/api/v1/")
        response = api.get(body["next"].removeprefix("http://testserver"))


# --- Workflows --------------------------------------------------------------------------------


def test_workflows_are_listed_by_slug_with_their_latest_version(api, make_version):
    make_version(OTHER)
    make_version(CHAIN)
    make_version({**CHAIN, "description": "changed"})
    body = api.get("workflows").json()
    assert [(w["slug"], w["latest_version"]) for w in body["results"]] == [
        ("chain", 2),
        ("other", 1),
    ]
    assert body["results"][0]["runs_url"] == "http://testserver/api/v1/workflows/chain/runs"
    assert [w["slug"] for w in all_pages(api, "workflows", {"limit": 1})] == ["chain", "other"]


def test_workflow_detail_shows_the_latest_version_params_timeout_and_nodes(api, make_version):
    make_version({**CHAIN, "timeout": 600})
    body = api.get("workflows/chain").json()
    assert body["latest"]["number"] == 1
    assert body["latest"]["timeout"] == 600
    assert body["latest"]["params"] == {"day": "2026-01-01"}
    assert body["latest"]["nodes"] == ["a", "b", "c"]


def test_a_workflow_without_a_version_shows_latest_null(api):
    Workflow.objects.create(slug="empty", name="Empty")
    body = api.get("workflows/empty").json()
    assert body["latest"] is None and body["latest_version"] is None


def test_an_unknown_workflow_is_404_saying_where_to_look(api):
    response = api.get("workflows/nope")
    assert response.status_code == 404
    assert "No workflow 'nope'" in response.json()["error"]["message"]
    assert api.get("workflows/nope/runs").status_code == 404


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("workflows", {"after": "a\x00b"}),
        ("runs", {"workflow": "a\x00b"}),
        ("findings", {"code": "stale\x00"}),
    ],
)
def test_a_nul_in_a_filter_is_400_not_a_database_error(api, path, params):
    # PostgreSQL refuses NUL in text; schemathesis found this one as a 500.
    response = api.get(path, params)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == next(iter(params))


# --- Run lists --------------------------------------------------------------------------------


@pytest.fixture
def many_runs(start_run, failed_chain, make_version):
    """Seven chain runs (one failed, six running) and two of another workflow."""
    chain = make_version(CHAIN)
    for _ in range(6):
        start_run(chain)
    other = make_version(OTHER)
    return [failed_chain, *(start_run(other) for _ in range(2))]


def test_runs_are_listed_newest_first_and_paged_without_gaps_or_repeats(api, many_runs):
    every = all_pages(api, "runs", {"limit": 2})
    expected = list(Run.objects.order_by("-created_at", "-id").values_list("id", flat=True))
    assert [run["id"] for run in every] == expected
    assert len(every) == 9


def test_runs_filter_by_workflow_and_status(api, many_runs, failed_chain):
    chain = all_pages(api, "runs", {"workflow": "chain", "limit": 3})
    assert len(chain) == 7 and {run["workflow"] for run in chain} == {"chain"}
    failed = api.get("runs", {"status": "failed"}).json()["results"]
    assert [run["id"] for run in failed] == [failed_chain.pk]
    both = api.get("runs", {"status": "failed,running", "workflow": "other"}).json()["results"]
    assert len(both) == 2
    same = all_pages(api, "workflows/chain/runs", {"status": "running", "limit": 4})
    assert len(same) == 6


def test_the_next_link_keeps_the_filters(api, many_runs):
    first = api.get("runs", {"workflow": "chain", "limit": 2}).json()
    assert "workflow=chain" in first["next"] and "cursor=" in first["next"]


@pytest.mark.parametrize(
    "params, field",
    [
        ({"status": "broken"}, "status"),
        ({"status": ","}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"workflow": "nope"}, "workflow"),
    ],
)
def test_bad_list_parameters_are_400_naming_the_field(api, params, field):
    response = api.get("runs", params)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["message"].startswith(f"{field}: ")


def test_pages_of_runs_created_at_the_same_moment_have_no_gaps_or_repeats(api, many_runs):
    Run.objects.update(created_at=Run.objects.earliest("created_at").created_at)
    every = all_pages(api, "runs", {"limit": 2})
    assert [run["id"] for run in every] == sorted(Run.objects.values_list("id", flat=True))[::-1]


def test_the_run_list_costs_the_same_number_of_queries_at_any_size(api, start_run, make_version):
    chain = make_version(CHAIN)
    start_run(chain)
    with CaptureQueriesContext(connection) as few:
        assert api.get("runs").status_code == 200
    for _ in range(15):
        start_run(chain)
    with CaptureQueriesContext(connection) as many:
        assert len(api.get("runs").json()["results"]) == 16
    assert len(many) == len(few)


# --- One run ----------------------------------------------------------------------------------


def test_run_detail_has_its_nodes_in_definition_order(api, failed_chain):
    body = api.get(f"runs/{failed_chain.pk}").json()
    assert (body["status"], body["finished"], body["reason"]) == ("failed", True, "b failed")
    assert [(n["key"], n["status"], n["attempt"]) for n in body["nodes"]] == [
        ("a", "succeeded", 1),
        ("b", "failed", 1),
        ("c", "pending", 0),
    ]
    assert body["nodes"][0]["output"] == {"a": 1}
    assert body["nodes"][2]["after"] == ["b"]
    assert body["nodes"][1]["logs_url"].endswith(f"/api/v1/runs/{failed_chain.pk}/nodes/b/logs")
    for node in body["nodes"]:  # reversed once per run: each is what reverse() says
        for name, field in (("node-attempts", "attempts_url"), ("node-logs", "logs_url")):
            path = reverse(f"api:{name}", args=[failed_chain.pk, node["key"]])
            assert node[field] == f"http://testserver{path}"
    assert body["web_url"] == f"http://testserver/runs/{failed_chain.pk}/"


def test_run_detail_costs_the_same_number_of_queries_for_more_nodes(api, start_run):
    small = start_run({"name": "Small", "nodes": {"a": {"type": "keel.noop"}}})
    wide = start_run({"name": "Wide", "nodes": {f"n{i}": {"type": "keel.noop"} for i in range(30)}})
    with CaptureQueriesContext(connection) as one:
        api.get(f"runs/{small.pk}")
    with CaptureQueriesContext(connection) as thirty:
        assert len(api.get(f"runs/{wide.pk}").json()["nodes"]) == 30
    assert len(thirty) == len(one)


@pytest.mark.parametrize("path", ["runs/999999", "runs/0", "runs/99999999999999999999999"])
def test_an_unknown_run_is_404(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_events_are_the_runs_history_oldest_first_and_paged(api, failed_chain):
    events = all_pages(api, f"runs/{failed_chain.pk}/events", {"limit": 1})
    assert events[0]["reason"] == "run started" and events[0]["node"] is None
    assert any(e["node"] == "b" and e["after"] == {"status": "failed"} for e in events)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)


def test_checkpoints_list_what_rollback_can_go_back_to(api, failed_chain):
    checkpoints = api.get(f"runs/{failed_chain.pk}/checkpoints").json()["results"]
    assert [(c["node"], c["kind"], c["state"]) for c in checkpoints] == [
        ("a", "node_done", {"output": {"a": 1}}),
        ("b", "progress", {"offset": 500}),
    ]


# --- Attempts and logs ------------------------------------------------------------------------


def test_attempts_show_worker_error_and_times(api, failed_chain):
    body = api.get(f"runs/{failed_chain.pk}/nodes/b/attempts").json()
    [attempt] = body["results"]
    assert (body["node"], attempt["number"], attempt["status"]) == ("b", 1, "failed")
    assert (attempt["worker"], attempt["error_type"], attempt["error_message"]) == (
        "w1",
        "ValueError",
        "boom",
    )
    assert attempt["finished_at"] and attempt["duration_seconds"] is not None


def test_logs_of_the_current_attempt_are_paged_and_returned_as_data(api, failed_chain):
    lines = all_pages(api, f"runs/{failed_chain.pk}/nodes/b/logs", {"limit": 1})
    assert [(line["seq"], line["message"]) for line in lines] == [
        (1, "reading"),
        (2, "<b>boom</b>"),
    ]
    response = api.get(f"runs/{failed_chain.pk}/nodes/b/logs")
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["attempt"] == 1


def test_logs_of_an_earlier_attempt_by_number(api, failed_chain):
    api.post(f"runs/{failed_chain.pk}/nodes/b/retry", {"reason": "again"})
    work(failed_chain, "b", logs=["second try"])
    latest = api.get(f"runs/{failed_chain.pk}/nodes/b/logs").json()
    assert latest["attempt"] == 2 and [x["message"] for x in latest["results"]] == ["second try"]
    first = api.get(f"runs/{failed_chain.pk}/nodes/b/logs", {"attempt": 1}).json()
    assert [x["message"] for x in first["results"]] == ["reading", "<b>boom</b>"]


def test_logs_of_a_node_that_never_ran_are_empty(api, failed_chain):
    body = api.get(f"runs/{failed_chain.pk}/nodes/c/logs").json()
    assert (body["attempt"], body["results"], body["next"]) == (None, [], None)


def test_an_unknown_node_or_attempt_is_404_naming_what_exists(api, failed_chain):
    response = api.get(f"runs/{failed_chain.pk}/nodes/zzz/attempts")
    assert response.status_code == 404
    assert "has no node 'zzz' (its nodes: a, b, c)" in response.json()["error"]["message"]
    response = api.get(f"runs/{failed_chain.pk}/nodes/b/logs", {"attempt": 7})
    assert response.status_code == 404
    assert "has no attempt 7" in response.json()["error"]["message"]


# --- Every list: the same queries at any size -------------------------------------------------

LISTS = [
    "workflows",
    "runs",
    "runs?status=failed,running",
    "workflows/chain/runs",
    "runs/{run}/events",
    "runs/{run}/checkpoints",
    "runs/{run}/nodes/b/attempts",
    "runs/{run}/nodes/b/logs",
    "runs/{run}/nodes/b/logs?attempt=1",
    "findings",
    "findings?state=recent",
    "findings?run={run}&code=heartbeat_stale",
]


def grow(run, count: int) -> None:
    """``count`` more rows of every kind the lists return, about ``run`` where they can be."""
    b = nodes(run)["b"]
    now = timezone.now()
    base = Workflow.objects.count()
    Workflow.objects.bulk_create(
        Workflow(slug=f"grown-{base + index}", name="Grown") for index in range(count)
    )
    Run.objects.bulk_create(
        Run(workflow=run.workflow, version=run.version, status=Run.Status.FAILED, trigger="t")
        for _ in range(count)
    )
    RunEvent.objects.bulk_create(
        RunEvent(run=run, node_run=b, kind=RunEvent.Kind.OPERATOR, actor="t", reason="grown")
        for _ in range(count)
    )
    first = Checkpoint.objects.filter(node_run=b).count() + 100
    Checkpoint.objects.bulk_create(
        Checkpoint(run=run, node_run=b, kind="progress", sequence=first + n, attempt=1, state={})
        for n in range(count)
    )
    attempt = NodeAttempt.objects.get(node_run=b, number=1)
    number = NodeAttempt.objects.filter(node_run=b).count() + 100
    NodeAttempt.objects.bulk_create(
        NodeAttempt(node_run=b, number=number + n, status="failed", rq_job_id="x", queue="q")
        for n in range(count)
    )
    seq = LogLine.objects.filter(attempt=attempt).count() + 100
    LogLine.objects.bulk_create(
        LogLine(attempt=attempt, seq=seq + n, at=now, level="INFO", message="grown")
        for n in range(count)
    )
    seen = Finding.objects.count()
    Finding.objects.bulk_create(
        Finding(
            code="heartbeat_stale",
            subject=f"grown:{seen + n}",
            run=run,
            node_run=b,
            title="Stale",
            suggestion="Retry it.",
            first_seen=now,
            last_seen=now,
            resolved_at=now if n % 2 else None,
        )
        for n in range(count)
    )


def test_every_list_costs_the_same_number_of_queries_with_five_times_the_rows(api, failed_chain):
    def queries() -> dict[str, int]:
        counts = {}
        for path in LISTS:
            with CaptureQueriesContext(connection) as captured:
                response = api.get(path.format(run=failed_chain.pk))
            assert response.status_code == 200, (path, response.content)
            assert len(response.json()["results"]) >= 2, path
            counts[path] = len(captured)
        return counts

    grow(failed_chain, 4)
    few = queries()
    grow(failed_chain, 16)
    assert queries() == few
