"""The Workers page: every worker and what it runs, live; and "Stop current node…" through
the usual preview page, stopping a real worker's long node."""

import os
import re
import socket

import psutil
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.conftest import wait_for
from tests.diagnostics.test_worker_findings import register_worker
from tests.web.conftest import user_with
from tests.web.test_xss import PAYLOAD, assert_inert
from workflows import engine
from workflows.models import NodeAttempt, NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)

LONG = {
    "name": "Long",
    "nodes": {
        "long": {
            "type": "test.sleep_first",
            "params": {"seconds": 600},
            "timeout": 900,
            "retries": {"max_attempts": 3},
        },
        "after_long": {"type": "test.record", "after": ["long"]},
    },
}


def staff(django_user_model, username: str, *codenames: str) -> Client:
    user = user_with(django_user_model, username, *codenames)
    user.is_staff = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator(django_user_model) -> Client:
    return staff(django_user_model, "olga", "view_run", "operate_run")


def stop_link(html: str) -> str:
    [href] = re.findall(r'href="([^"]*/stop-node/preview/[^"]*)"', html)
    return href.replace("&amp;", "&")


@pytest.mark.workers
def test_a_real_workers_node_is_stopped_from_the_workers_page(operator, start_worker, start_run):
    worker = start_worker()
    run = start_run(LONG)
    horse = wait_for(
        lambda: (
            NodeAttempt.objects.filter(node_run__run=run, status="running")
            .values_list("pid", flat=True)
            .first()
        ),
        message="the long node to run",
    )
    page = wait_for(
        lambda: (
            (html := operator.get("/workers/").content.decode()) and "stop-node" in html and html
        ),
        message="the page to offer the stop",
    )
    assert worker.name in page and f"run #{run.pk}" in page and "▶</span> busy" in page

    preview = operator.get(stop_link(page))
    assert preview.status_code == 200
    html = preview.content.decode()
    assert "Stop a running node" in html
    assert "attempt 1 on worker " + worker.name + " is stopped and fails; it is not retried" in html
    assert "after_long will not run until you retry or skip long." in html
    key = re.search(r'name="request_key" value="([^"]+)"', html)[1]
    form = {"node": "long", "expected_attempt": "1", "request_key": key}

    response = operator.post(f"/runs/{run.pk}/stop-node/", {**form, "reason": "wrong input file"})

    assert response.status_code == 302 and response["Location"] == f"/runs/{run.pk}/?node=long"
    long = NodeRun.objects.get(run=run, node_key="long")
    assert (long.status, long.reason) == ("failed", "stopped by olga: wrong input file")
    attempt = NodeAttempt.objects.get(node_run=long, number=1)
    assert (attempt.status, attempt.error_type) == ("failed", "StoppedByOperator")
    assert long.attempt == 1  # not retried, though three attempts were allowed
    event = RunEvent.objects.get(run=run, kind="operator")
    assert (event.actor, event.reason, event.before["worker"]) == (
        "olga",
        "wrong input file",
        worker.name,
    )
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.reason == "long failed"
    # The worker was told to stop the job: its work horse is gone, the worker lives on.
    wait_for(lambda: not psutil.pid_exists(horse), message="the horse to be stopped")
    assert worker.process.poll() is None
    page = wait_for(
        lambda: (
            (html := operator.get("/workers/").content.decode())
            and "○</span> idle" in html
            and html
        ),
        message="the worker to be idle",
    )
    assert "stop-node" not in page

    # A second stop, from a page still open elsewhere: refused, and said.
    again = operator.post(
        f"/runs/{run.pk}/stop-node/",
        {**form, "request_key": "web-another", "reason": "again"},
        follow=True,
    )
    assert f"Node long of run {run.pk} is failed, not running; nothing to stop." in (
        again.content.decode()
    )
    assert RunEvent.objects.filter(run=run, kind="operator").count() == 1
    # The preview says so too, and offers no confirm button.
    late = operator.get(f"/runs/{run.pk}/stop-node/preview/?node=long&expected_attempt=1")
    assert b"nothing to stop" in late.content and b"Stop node</button>" not in late.content


def test_the_page_lists_each_worker_with_its_state_node_and_counts(
    operator, clean_redis, start_run
):
    run = start_run(LONG)
    node = NodeRun.objects.get(run=run, node_key="long")
    engine.claim_attempt(node.pk, 1, worker="w-busy", pid=os.getpid(), host="h")
    register_worker(
        clean_redis,
        "w-busy",
        pid=os.getpid(),
        current_job=f"keel-{node.pk}-1",
        successful_job_count=7,
        failed_job_count=2,
        queues="high,default",
    )
    register_worker(clean_redis, "w-idle", pid=os.getpid())

    response = operator.get("/workers/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "2 workers" in html and "1 busy" in html and "1 idle" in html
    assert f'href="/runs/{run.pk}/?node=long"' in html and "attempt 1" in html
    assert '7 / <span class="fail-count">2</span>' in html
    assert "high, default" in html and socket.gethostname() in html
    assert stop_link(html) == f"/runs/{run.pk}/stop-node/preview/?node=long&expected_attempt=1"
    assert 'aria-current="page">Workers</a>' in html
    assert 'hx-get="/workers/"' in html

    # Stopped, while RQ still says the worker holds the job: said, and no second stop offered.
    engine.stop_node(run.pk, "long", actor="olga", reason="enough")
    html = operator.get("/workers/").content.decode()
    assert "this attempt is over (the node is failed); the worker is letting go of it" in html
    assert "stop-node" not in html


def test_the_page_reads_a_bounded_number_of_rows(operator, clean_redis, start_run):
    wide = {"name": "Wide", "nodes": {f"n{i}": {"type": "test.record"} for i in range(10)}}
    node_runs = list(NodeRun.objects.filter(run=start_run(wide)).order_by("id"))

    def busy(nodes) -> int:
        for node in nodes:
            name = f"w-{node.pk}"
            engine.claim_attempt(node.pk, 1, worker=name, pid=os.getpid(), host="h")
            register_worker(clean_redis, name, pid=os.getpid(), current_job=f"keel-{node.pk}-1")
        with CaptureQueriesContext(connection) as queries:
            assert operator.get("/workers/").status_code == 200
        return len(queries)

    assert busy(node_runs[:1]) == busy(node_runs[1:])


def test_htmx_gets_the_table_alone_and_a_signed_out_poll_stops(operator, clean_redis, client):
    register_worker(clean_redis, "w-idle", pid=os.getpid())

    partial = operator.get("/workers/", headers={"HX-Request": "true"})
    assert partial.status_code == 200
    assert partial.content.decode().lstrip().startswith('<section id="workers-live"')
    assert b"<html" not in partial.content and b"w-idle" in partial.content

    signed_out = client.get("/workers/", headers={"HX-Request": "true"})
    assert signed_out.status_code == 286 and b"You were signed out" in signed_out.content


def test_staff_without_the_operate_permission_see_no_stop_button(
    django_user_model, clean_redis, start_run
):
    run = start_run(LONG)
    node = NodeRun.objects.get(run=run, node_key="long")
    engine.claim_attempt(node.pk, 1, worker="w-busy", pid=os.getpid(), host="h")
    register_worker(clean_redis, "w-busy", pid=os.getpid(), current_job=f"keel-{node.pk}-1")
    looker = staff(django_user_model, "sam", "view_run")

    html = looker.get("/workers/").content.decode()

    assert f"run #{run.pk}" in html and "stop-node" not in html
    # Posting anyway is refused, and the refusal is in the run's history.
    denied = looker.post(
        f"/runs/{run.pk}/stop-node/", {"node": "long", "reason": "let me", "request_key": "k"}
    )
    assert denied.status_code == 403
    assert NodeRun.objects.get(pk=node.pk).status == "running"
    assert RunEvent.objects.get(run=run, kind="operator").before == {
        "action": "stop_node",
        "denied": True,
    }


def test_the_page_is_for_staff(client, django_user_model, db):
    assert client.get("/workers/").status_code == 302
    viewer = Client()
    viewer.force_login(user_with(django_user_model, "victor", "view_run", "operate_run"))
    assert viewer.get("/workers/").status_code == 403
    assert 'href="/workers/"' not in viewer.get("/").content.decode()


def test_redis_down_is_said_on_the_page(operator, settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.REDIS_URL = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"

    response = operator.get("/workers/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "Redis could not be read" in html and "ConnectionError" in html
    assert "manage.py doctor" in html


def test_no_worker_says_how_to_start_one(operator, clean_redis):
    html = operator.get("/workers/").content.decode()
    assert "No worker is registered" in html and "manage.py rqworker high default low" in html


def test_what_a_worker_writes_in_redis_is_shown_inert(operator, clean_redis):
    register_worker(
        clean_redis,
        f"w-{PAYLOAD}",
        pid=os.getpid(),
        host=PAYLOAD,
        queues=PAYLOAD,
        current_job=PAYLOAD,
    )

    response = operator.get("/workers/")

    assert response.status_code == 200
    assert_inert(response.content.decode(), "workers page")
