"""GET /api/v1/workers, and stopping a worker's node through the stop_node action's endpoint."""

import os
import socket

import pytest

from tests.api.conftest import Api, make_user
from tests.diagnostics.test_worker_findings import register_worker
from workflows import engine
from workflows.models import NodeAttempt, NodeRun, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)

HELD = {
    "name": "Held",
    "nodes": {
        "held": {"type": "test.record", "retries": {"max_attempts": 2}},
        "next": {"type": "test.record", "after": ["held"]},
    },
}


@pytest.fixture
def busy_worker(clean_redis, start_run):
    """A run whose node worker w-busy runs, as RQ's key and the database say."""
    run = start_run(HELD)
    node = NodeRun.objects.get(run=run, node_key="held")
    engine.claim_attempt(node.pk, 1, worker="w-busy", pid=os.getpid(), host="h")
    register_worker(
        clean_redis,
        "w-busy",
        pid=os.getpid(),
        current_job=f"keel-{node.pk}-1",
        successful_job_count=4,
    )
    register_worker(clean_redis, "w-idle", pid=os.getpid())
    return run


def test_workers_are_listed_with_what_they_run(api, busy_worker):
    response = api.get("workers")

    assert response.status_code == 200
    data = response.json()
    assert (data["registered"], data["shown"], data["hidden"]) == (2, 2, 0)
    assert data["counts"] == {"dead": 0, "unresponsive": 0, "busy": 1, "suspended": 0, "idle": 1}
    busy, idle = data["workers"]
    assert (busy["name"], busy["state"], busy["host"], busy["pid"]) == (
        "w-busy",
        "busy",
        socket.gethostname(),
        os.getpid(),
    )
    assert busy["queues"] == ["default"] and busy["successful_jobs"] == 4
    node = busy["current_node"]
    assert (node["run"], node["node"], node["attempt"], node["running"]) == (
        busy_worker.pk,
        "held",
        1,
        True,
    )
    assert node["stop"] == f"/api/v1/runs/{busy_worker.pk}/nodes/held/stop-node"
    assert node["url"] == f"/runs/{busy_worker.pk}/?node=held"
    assert busy["since"] == node["started_at"] is not None
    assert busy["restarts"] == {
        "count": None,
        "exact": False,
        "source": "",
        "note": busy["restarts"]["note"],
    }
    assert idle["current_node"] is None and idle["state"] == "idle"


def test_the_stop_link_stops_the_node_once(api, busy_worker):
    stop = api.get("workers").json()["workers"][0]["current_node"]["stop"]

    preview = api.post(f"{stop}?dry_run=true", {"expected_attempt": 1})
    assert preview.status_code == 200
    assert preview.json()["preview"]["nodes"][0]["will"] == (
        "attempt 1 on worker w-busy is stopped and fails; it is not retried"
    )
    assert NodeRun.objects.get(run=busy_worker, node_key="held").status == "running"

    response = api.post(stop, {"reason": "runaway query", "expected_attempt": 1})

    assert response.status_code == 200
    assert response.json()["changed"] is True
    nodes = {node["key"]: node for node in response.json()["run"]["nodes"]}
    assert nodes["held"]["status"] == "failed"
    held = NodeRun.objects.get(run=busy_worker, node_key="held")
    assert held.reason == "stopped by olga: runaway query" and held.attempt == 1
    assert NodeAttempt.objects.get(node_run=held).error_type == "StoppedByOperator"
    assert RunEvent.objects.get(run=busy_worker, kind="operator").actor == "olga"
    # The worker page no longer offers the stop while the worker lets go of the job.
    listed = api.get("workers").json()["workers"][0]["current_node"]
    assert (listed["running"], listed["stop"], listed["node_status"]) == (False, None, "failed")

    again = api.post(stop, {"reason": "again", "expected_attempt": 1})
    assert again.status_code == 200 and again.json()["changed"] is False
    assert again.json()["message"].endswith("is failed, not running; nothing to stop.")
    assert RunEvent.objects.filter(run=busy_worker, kind="operator").count() == 1


def test_a_viewer_may_list_workers_but_not_stop_a_node(viewer_api, busy_worker):
    assert viewer_api.get("workers").status_code == 200

    response = viewer_api.post(f"runs/{busy_worker.pk}/nodes/held/stop-node", {"reason": "let me"})

    assert response.status_code == 403
    assert NodeRun.objects.get(run=busy_worker, node_key="held").status == "running"


def test_a_user_without_permissions_may_not_list_workers(client, django_user_model, token_for):
    nobody = Api(client, token_for(make_user(django_user_model, "nina")))
    assert nobody.get("workers").status_code == 403


def test_redis_down_is_a_503_that_says_so(api, settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.REDIS_URL = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"

    response = api.get("workers")

    assert response.status_code == 503 and response["Retry-After"] == "5"
    assert response.json()["error"]["message"].startswith("Redis could not be read (")


def test_the_limit_is_checked(api, clean_redis):
    assert api.get("workers", {"limit": 0}).status_code == 400
    assert api.get("workers", {"limit": 1}).json()["workers"] == []
