"""``manage.py diagnose`` and the explanations behind it (the dashboard shows the same)."""

import json
import os
import re
import signal
import socket

import pytest
from django.core.management import CommandError, call_command

import bench.fault_nodes  # noqa: F401  (registers faults.* in this process too)
from diagnostics import explain, watchdog
from diagnostics.models import Finding
from tests.conftest import wait_for
from workflows import engine, operations
from workflows.models import NodeAttempt, NodeRun

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

NODE_MODULES = "workflows.nodes.builtin,workflows.nodes.demo,tests.nodes,bench.fault_nodes"


def diagnose(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command("diagnose", *[str(a) for a in args], stdout=out)
    return out.getvalue()


def test_diagnose_a_run_with_a_frozen_node(start_worker, start_run):
    start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    run = start_run(
        {"name": "Frozen", "nodes": {"n": {"type": "faults.stall", "params": {"seconds": 30}}}}
    )
    # The log lines are the last write of a beat: frozen after it, the horse holds no
    # lock (frozen inside a write, it would hold SQLite's for good).
    node = wait_for(
        lambda: NodeRun.objects.filter(
            run=run, progress__isnull=False, attempts__log_lines__isnull=False
        ).first(),
        message="a heartbeat with progress and logs",
    )
    horse = NodeAttempt.objects.get(node_run=node, number=1).pid
    os.kill(horse, signal.SIGSTOP)
    try:
        wait_for(
            lambda: watchdog.tick() and Finding.objects.filter(code="heartbeat_stale").exists(),
            timeout=20,
            interval=0.3,
            message="heartbeat_stale",
        )
        text = diagnose(run.pk)
        data = json.loads(diagnose(run.pk, "--json"))
    finally:
        os.kill(horse, signal.SIGCONT)
    operations.cancel_run(run.pk, actor="test", reason="done")

    assert text.startswith(f"Run {run.pk} · frozen v1 · running")
    assert "Problems: heartbeat stale." in text
    assert "✗ CRITICAL heartbeat_stale: Node n of run" in text
    assert "What it means: The node is marked running, but the process" in text
    assert re.search(rf"\n      pid +{horse}\n", text)
    assert re.search(r"\n      progress +1 of 10 stuck on item 2\n", text)
    assert re.search(r"\n      last heartbeat +[-\d]+ [:\d]+ \w+ \(\d+s ago\)\n", text)
    assert "WARNING waiting for the lock on item 2" in text
    assert "What to do: The worker" in text
    assert f"Action: Retry node n of run {run.pk}" in text
    assert f"→ Retry node n of run {run.pk}" in text

    assert data["run_id"] == run.pk and data["status"] == "running"
    (finding,) = data["findings"]
    assert finding["code"] == "heartbeat_stale"
    assert {"label": "pid", "value": str(horse)} in finding["evidence"]
    assert finding["last_log_lines"][-1]["message"] == "waiting for the lock on item 2"
    assert finding["action"] == {
        "kind": "retry_node",
        "run": run.pk,
        "node": "n",
        "label": f"Retry node n of run {run.pk}",
    }


def test_diagnose_without_a_run_lists_every_open_finding_by_cause(start_run, settings):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    start_run({"name": "Waiting", "nodes": {"n": {"type": "test.record"}}})
    watchdog.tick()

    text = diagnose()
    data = json.loads(diagnose("--json"))

    assert text.startswith("1 open finding(s)")
    assert "no_worker (1)" in text
    assert "Action: Run `manage.py rqworker default`" in text
    assert [f["code"] for f in data["open_findings"]] == ["no_worker"]


def test_a_run_waiting_on_a_queue_without_workers_shows_why(start_run, settings):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    run = start_run({"name": "Waiting", "nodes": {"n": {"type": "test.record"}}})
    watchdog.tick()

    diagnosis = explain.diagnose_run(run.pk)
    node = explain.diagnose_node(NodeRun.objects.get(run=run, node_key="n"))

    assert [f.code for f in diagnosis.findings] == ["no_worker"]
    assert "Problems: no worker." in diagnosis.summary
    assert diagnosis.actions[0]["label"] == "Run `manage.py rqworker default`"
    assert "No worker listens to queue default" in node.summary


def test_diagnose_says_so_when_nothing_is_open(db):
    assert diagnose().strip() == "No open findings: nothing looks stuck."


def test_diagnose_a_failed_run_names_the_failed_node_and_what_it_blocked(start_run):
    run = start_run(
        {
            "name": "Broken",
            "nodes": {
                "extract": {"type": "test.record"},
                "load": {"type": "test.record", "after": ["extract"]},
            },
        }
    )
    extract = NodeRun.objects.get(run=run, node_key="extract")
    engine.claim_attempt(extract.pk, 1, worker="w", pid=os.getpid(), host=socket.gethostname())
    engine.fail_attempt(
        extract.pk, 1, engine.Failure("ConnectionError", "warehouse refused"), actor="w"
    )

    diagnosis = explain.diagnose_run(run.pk)
    text = diagnose(run.pk)

    assert diagnosis.status == "failed"
    assert "failed because node extract failed: attempt 1 failed: ConnectionError: " in (
        diagnosis.summary
    )
    assert "Never ran because of it: load." in diagnosis.summary
    assert [a["label"] for a in diagnosis.actions] == [
        f"Retry node extract of run {run.pk}",
        f"Resume run {run.pk}",
    ]
    assert f"→ Resume run {run.pk}" in text


def test_diagnose_an_unknown_run_says_what_to_do(db):
    with pytest.raises(CommandError, match=r"No run 999999\. Run `manage\.py diagnose` without"):
        diagnose(999999)


def test_node_diagnosis_of_a_node_waiting_for_a_pool(start_run, settings):
    settings.KEEL_POOL_WAIT_SECONDS = 0
    pooled = {
        "name": "Pooled",
        "pools": {"warehouse": 1},
        "nodes": {"load": {"type": "test.record", "pool": "warehouse"}},
    }
    start_run(pooled)
    waiter = start_run(pooled)
    watchdog.tick()
    node = NodeRun.objects.get(run=waiter, node_key="load")

    diagnosis = explain.diagnose_node(node)

    assert diagnosis.summary.startswith(
        f"Node load of run {waiter.pk} is pending. Waiting for pool warehouse (all slots in use)."
    )
    assert f"Run {waiter.pk} waits for pool warehouse" in diagnosis.summary
    assert diagnosis.actions == [
        {
            "kind": "resize_pool",
            "pool": "warehouse",
            "slots": 2,
            "label": "Raise pool warehouse to 2 slot(s)",
        }
    ]


def test_run_diagnosis_reads_a_bounded_number_of_queries(
    start_run, settings, django_assert_max_num_queries
):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    settings.KEEL_BACKLOG_LENGTH = 1
    settings.KEEL_POOL_WAIT_SECONDS = 0
    run = start_run(
        {
            "name": "Many",
            "pools": {"slot": 1},
            "nodes": {f"n{i}": {"type": "test.record", "pool": "slot"} for i in range(8)},
        }
    )
    watchdog.tick()
    assert Finding.objects.filter(run=run).exists()

    with django_assert_max_num_queries(8):
        explain.diagnose_run(run.pk).as_dict()
