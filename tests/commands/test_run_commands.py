"""run_workflow, show_run and cancel_run as an operator uses them, with real workers."""

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import BASE_DIR, finished, subprocess_env
from workflows.definitions import versioning
from workflows.models import NodeAttempt, NodeRun, Run

pytestmark = pytest.mark.django_db(transaction=True)
DEMOS = BASE_DIR / "workflows" / "demo_definitions"


def run_command(*args) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command(*args, stdout=out, stderr=out)
    except SystemExit as exit_:
        return exit_.code, out.getvalue()
    return 0, out.getvalue()


def load_demos():
    for path in sorted(DEMOS.glob("*.yaml")):
        versioning.load_file(path, actor="test")


@pytest.mark.workers
@pytest.mark.parametrize("slug", ["fan-out", "sales-etl"])
def test_demo_workflow_runs_to_success_and_exits_zero(slug, start_worker, settings, tmp_path):
    settings.KEEL_DATA_DIR = tmp_path
    load_demos()
    start_worker(KEEL_DATA_DIR=tmp_path)
    code, output = run_command("run_workflow", slug, "--wait", "120")
    assert code == 0, output
    assert f"of {slug} v1: succeeded" in output
    run = Run.objects.get()
    if slug == "sales-etl":
        assert NodeRun.objects.get(run=run, node_key="transform").output["rows"] == 100_000
    else:
        assert NodeRun.objects.get(run=run, node_key="combine").output == {
            "shards": 50,
            "total": sum(value * value for value in range(1_000_000)),
        }


@pytest.mark.workers
def test_flaky_and_slow_demo_retries_and_resumes(start_worker, start_watchdog):
    load_demos()
    start_worker()
    start_watchdog()  # the fetch's retries back off: the watchdog queues them when due
    code, output = run_command("run_workflow", "flaky-and-slow", "--wait", "120")
    run = Run.objects.get()
    crunch = list(
        NodeAttempt.objects.filter(node_run__run=run, node_run__node_key="crunch").order_by(
            "number"
        )
    )
    assert [a.error_type for a in crunch[:-1]] == ["SoftTimeout"] * (len(crunch) - 1)
    assert len(crunch) >= 3 and crunch[-1].status == NodeAttempt.Status.SUCCEEDED
    # The fetch fails at random; six attempts make a failed run rare but possible.
    fetch = NodeRun.objects.get(run=run, node_key="fetch")
    if fetch.status == NodeRun.Status.SUCCEEDED:
        assert code == 0, output
    else:
        assert code == 1 and run.status == Run.Status.FAILED


@pytest.mark.workers
def test_run_workflow_exits_one_when_the_run_fails(start_worker, make_version):
    make_version(
        {"name": "Broken", "nodes": {"x": {"type": "test.fail_until", "params": {"succeed_on": 9}}}}
    )
    start_worker()
    code, output = run_command("run_workflow", "broken", "--wait", "60")
    assert code == 1
    run = Run.objects.get()
    assert f"run {run.pk} of broken v1: failed" in output
    assert f"  reason: {run.reason}" in output and run.reason, "why it failed"
    assert f"see: manage.py show_run {run.pk}" in output


def test_run_workflow_exits_three_when_still_running_after_the_wait(make_version):
    make_version({"name": "Nobody works", "nodes": {"x": {"type": "keel.noop"}}})
    completed = subprocess.run(
        [sys.executable, "manage.py", "run_workflow", "nobody-works", "--wait", "1"],
        cwd=BASE_DIR,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 3, completed.stderr
    assert "still running after 1s" in completed.stdout


def test_run_workflow_explains_an_unknown_workflow_and_bad_params(make_version):
    make_version({"name": "Known", "params": {"day": "x"}, "nodes": {"x": {"type": "keel.noop"}}})
    with pytest.raises(
        CommandError,
        match=r"No workflow 'nope' \(known: known\)\. Load it with manage.py load_workflow",
    ):
        call_command("run_workflow", "nope")
    with pytest.raises(CommandError, match="--params is not valid JSON"):
        call_command("run_workflow", "known", "--params", "{day:")
    with pytest.raises(CommandError, match=r"Unknown run param\(s\) month"):
        call_command("run_workflow", "known", "--params", '{"month": 1}')
    assert not Run.objects.exists()


@pytest.mark.workers
def test_show_run_lists_nodes_attempts_and_reasons(start_worker, start_run):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Shown",
                "nodes": {
                    "flaky": {
                        "type": "test.fail_until",
                        "params": {"succeed_on": 2},
                        "retries": {"max_attempts": 2, "backoff": 0},
                    },
                    "never": {"type": "test.fail_until", "params": {"succeed_on": 9}},
                    "blocked": {"type": "keel.noop", "after": ["never"]},
                },
            }
        )
    )
    code, text = run_command("show_run", str(run.pk))
    assert code == 0
    assert f"run {run.pk} of shown v1: failed" in text
    assert "#1 failed" in text and "ConnectionError: planned failure on attempt 1" in text
    assert "blocked: upstream never failed" in text
    assert " 2/2 " in text and " 1/1 " in text, "attempts against their limit"

    code, raw = run_command("show_run", str(run.pk), "--json")
    detail = json.loads(raw)
    assert detail["status"] == "failed"
    assert {n["key"]: n["status"] for n in detail["nodes"]} == {
        "flaky": "succeeded",
        "never": "failed",
        "blocked": "pending",
    }
    assert [a["status"] for a in detail["nodes"][0]["attempts"]] == ["failed", "succeeded"]


def test_show_run_and_cancel_run_explain_an_unknown_run(db):
    with pytest.raises(CommandError, match=r"No run with id '999'"):
        call_command("show_run", "999")
    with pytest.raises(CommandError, match=r"No run with id 'abc'"):
        call_command("cancel_run", "abc", "--reason", "x")


def test_cancel_run_command_cancels_once_and_then_says_there_is_nothing_to_do(start_run):
    run = start_run({"name": "To cancel", "nodes": {"x": {"type": "keel.noop"}}})
    _, text = run_command("cancel_run", str(run.pk), "--reason", "bad data")
    assert f"Run {run.pk} cancelled." in text
    _, text = run_command("cancel_run", str(run.pk), "--reason", "bad data")
    assert f"Run {run.pk} is already cancelled; nothing to cancel." in text
    with pytest.raises(CommandError, match="A reason is required"):
        call_command("cancel_run", str(run.pk), "--reason", "  ")


def test_demo_definitions_are_in_the_repository():
    assert {p.name for p in Path(DEMOS).glob("*.yaml")} == {
        "sales_etl.yaml",
        "fan_out.yaml",
        "flaky_and_slow.yaml",
        "needs_fix.yaml",
    }


def test_attempts_count_from_the_last_operator_reset():
    from workflows.selectors import attempt_words

    assert attempt_words(2, 3, 0) == "2/3"
    assert attempt_words(2, 1, 1) == "1/1 (#2)", "retried by an operator: never 2/1"
    assert attempt_words(0, 1, 0) == "0/1"
