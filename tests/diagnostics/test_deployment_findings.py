"""Findings about releasing versions, driven through real watchdog ticks: runs left on a
version no longer deployed, a failing canary, a deployment that cannot finish."""

import re
import shlex
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnostics import detectors, explain, watchdog
from diagnostics.detectors import deployments as deployment_detectors
from diagnostics.models import Finding
from tests.deployments.test_deployments import finish, live, load, start
from workflows import operations
from workflows.deployments import judging, services
from workflows.models import Deployment, Run

pytestmark = pytest.mark.django_db(transaction=True)

CODES = {"retired_version_running", "canary_failing", "deployment_stuck"}


def open_finding(code: str) -> Finding | None:
    return Finding.objects.filter(code=code, resolved_at__isnull=True).first()


def resolved(finding: Finding) -> bool:
    finding.refresh_from_db()
    return finding.resolved_at is not None


def canary(steps=(50, 100), **fields) -> Deployment:
    """v1 live, v2 a canary on ``steps``."""
    load(1)
    v2 = load(2, deploying=None)
    deployment = services.deploy(
        v2, actor="test", reason="try v2", strategy="canary", steps=list(steps)
    ).deployment
    if fields:
        Deployment.objects.filter(pk=deployment.pk).update(**fields)
        deployment.refresh_from_db()
    return deployment


def on_version(runs, number: int) -> list[Run]:
    return [run for run in runs if run.version.number == number]


def run_as_suggested(finding: Finding) -> str:
    """The finding's command, run as an operator would paste it."""
    program, command, *args = shlex.split(finding.action["command"])
    assert (program, command) == ("manage.py", "move_runs_off")
    out = StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


def test_runs_left_on_an_aborted_canary_are_reported_until_cancelled(clean_redis):
    deployment = canary()
    runs = start(6)
    left = on_version(runs, 2)
    services.abort(deployment.pk, actor="test", reason="not now")
    start(2)  # after the abort: all on v1
    operations.start_run("orders", actor="test", version_number=2)  # by choice: not reported
    watchdog.tick()

    finding = open_finding("retired_version_running")
    assert finding is not None
    evidence = finding.evidence
    assert evidence["run_ids"] == sorted(run.pk for run in left)
    assert (evidence["running_runs"], evidence["version"], evidence["live_version"]) == (3, 2, 1)
    assert (evidence["deployment"], evidence["deployment_state"]) == (deployment.pk, "aborted")
    started = min(run.started_at for run in left)
    assert evidence["oldest_started_at"] == started.isoformat()
    assert finding.title.startswith("3 run(s) of orders still run v2, which was aborted at ")
    assert finding.title.endswith("new runs get v1")
    assert finding.action["kind"] == "move_runs_off"
    assert finding.action["command"] == (
        'manage.py move_runs_off orders 2 --runs restart --reason "orders v2 was aborted"'
    )
    assert explain.explain(finding).action["label"] == (
        "Restart or cancel the runs left on v2: `manage.py move_runs_off orders 2 --runs "
        'restart --reason "orders v2 was aborted"`'
    )
    explained = dict(explain.explain(finding).evidence)
    assert explained["runs still running"] == "3"
    assert explained["runs"] == ", ".join(str(run.pk) for run in left)

    said = run_as_suggested(finding)
    # The run started on v2 by number is unfinished on v2 too: the command ends it as well.
    assert "4 run(s) of orders v2 restarted on v1." in said
    for run in left:
        run.refresh_from_db()
        assert run.status == Run.Status.CANCELLED
        assert "moved off v2: orders v2 was aborted" in run.reason
        (again,) = Run.objects.filter(restarted_from=run)
        assert (again.version.number, again.params) == (1, run.params)
    watchdog.tick()
    assert resolved(finding)
    assert not Finding.objects.filter(code__in=CODES, resolved_at__isnull=True).exists()


def test_runs_left_on_a_rolled_back_version_name_the_rollback(clean_redis):
    load(1)
    load(2)
    (left,) = start(1)
    services.rollback_version(live().workflow, 1, actor="test", reason="v2 breaks", runs="finish")
    watchdog.tick()

    finding = open_finding("retired_version_running")
    assert finding.evidence["run_ids"] == [left.pk]
    assert finding.evidence["deployment_state"] == "rolled_back"
    assert "which was rolled back at" in finding.title
    call_command(
        "move_runs_off",
        "orders",
        "2",
        "--runs",
        "cancel",
        "--reason",
        "v2 breaks",
        stdout=StringIO(),
    )
    left.refresh_from_db()
    assert left.status == Run.Status.CANCELLED
    assert not Run.objects.filter(restarted_from=left).exists(), "cancel only cancels"
    watchdog.tick()
    assert resolved(finding)


def test_runs_on_the_blue_version_are_reported_only_after_its_retention(clean_redis):
    load(1)
    (blue,) = start(1)
    load(2, deploy={"strategy": "blue_green"})
    green = live(Deployment.State.VALIDATING)
    finish([green.validation_run], Run.Status.SUCCEEDED)
    judging.advance_in_flight()
    green.refresh_from_db()
    assert green.state == Deployment.State.ACTIVE

    watchdog.tick()
    assert open_finding("retired_version_running") is None, "v1 is the rollback target still"

    Deployment.objects.filter(pk=green.pk).update(
        retire_baseline_at=timezone.now() - timedelta(seconds=1)
    )
    watchdog.tick()
    finding = open_finding("retired_version_running")
    assert finding.evidence["run_ids"] == [blue.pk]
    assert "retired after its blue-green switch" in finding.title
    call_command("cancel_run", str(blue.pk), reason="v1 retired")
    watchdog.tick()
    assert resolved(finding)


def test_a_canary_failing_before_the_watchdog_can_judge_it_is_reported_until_aborted(
    clean_redis,
):
    deployment = canary()  # 50 %, min_runs 20
    runs = start(32)
    canary_runs, baseline_runs = on_version(runs, 2), on_version(runs, 1)
    finish(baseline_runs[:10], Run.Status.SUCCEEDED)
    finish(canary_runs[:2], Run.Status.SUCCEEDED)
    finish(canary_runs[2:3], Run.Status.FAILED)
    watchdog.tick()
    assert open_finding("canary_failing") is None, "1 of 3 against 0 of 10 is noise (p=0.23)"

    finish(canary_runs[3:6], Run.Status.FAILED)
    watchdog.tick()

    finding = open_finding("canary_failing")
    assert finding is not None
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.RAMPING, "6 of 20 runs: the watchdog waits"
    evidence = finding.evidence
    assert evidence["canary"] == {
        "runs": 6,
        "failures": 4,
        "failure_rate": 0.6667,
        "p95_seconds": 1.0,
    }
    assert (evidence["baseline"]["runs"], evidence["baseline"]["failures"]) == (10, 0)
    assert evidence["fisher_p"] == pytest.approx(66 / 8008, rel=1e-3)
    assert (evidence["step"], evidence["percent"], evidence["min_runs"]) == (0, 50, 20)
    assert finding.title == (
        "Canary orders v2 (50% of new runs) fails more often than v1: 4 of 6 runs (66.7%) "
        "against 0 of 10 (0.0%)"
    )
    assert finding.action["command"].startswith(f"manage.py abort_deployment {deployment.pk} ")
    explained = dict(explain.explain(finding).evidence)
    assert explained["canary"] == "4 of 6 failed (66.7%), p95 1.00s"
    assert explained["canary share"] == "50% of new runs"

    call_command("abort_deployment", deployment.pk, reason="canary fails")
    watchdog.tick()
    assert resolved(finding)


def test_a_validation_that_does_not_end_is_stuck_until_aborted(clean_redis):
    load(1)
    load(2, deploy={"strategy": "blue_green"})
    green = live(Deployment.State.VALIDATING)
    watchdog.tick()
    assert open_finding("deployment_stuck") is None

    Deployment.objects.filter(pk=green.pk).update(created_at=F("created_at") - timedelta(hours=1))
    watchdog.tick()

    finding = open_finding("deployment_stuck")
    evidence = finding.evidence
    assert evidence["validation_run"] == green.validation_run_id
    assert evidence["validation_run_status"] == "running"
    assert (evidence["finished_runs"], evidence["runs_needed"]) == (0, 1)
    assert evidence["deployment_state"] == "validating"
    assert f"validation run {green.validation_run_id} is still running" in finding.title
    assert finding.action["command"].startswith(f"manage.py abort_deployment {green.pk} ")

    call_command("abort_deployment", green.pk, reason="validation hangs")
    watchdog.tick()
    assert resolved(finding)
    assert live().version.number == 1


@pytest.mark.parametrize(
    ("outcome", "advice"),
    [(Run.Status.SUCCEEDED, "promote"), (Run.Status.FAILED, "abort"), (None, "abort")],
)
def test_a_canary_step_without_traffic_is_stuck_until_promoted_or_aborted(
    clean_redis, settings, outcome, advice
):
    settings.KEEL_CANARY_STEP_STUCK_SECONDS = 600
    deployment = canary(steps=(10, 100))
    runs = start(20)  # two on the canary: far from min_runs (20)
    if outcome:
        finish(runs, outcome)
    watchdog.tick()
    assert open_finding("deployment_stuck") is None

    Deployment.objects.filter(pk=deployment.pk).update(
        step_started_at=F("step_started_at") - timedelta(seconds=601)
    )
    watchdog.tick()

    finding = open_finding("deployment_stuck")
    evidence = finding.evidence
    finished_runs = 2 if outcome else 0
    assert (evidence["finished_runs"], evidence["runs_needed"]) == (finished_runs, 20)
    assert evidence["stuck_after_seconds"] == 600
    assert finding.title.startswith("Canary orders v2 at 10% has too little traffic to decide")
    assert finding.action["command"].startswith(f"manage.py {advice}_deployment {deployment.pk} ")
    assert "blue_green" in finding.suggestion or outcome

    call_command(f"{advice}_deployment", deployment.pk, reason="too little traffic")
    watchdog.tick()
    assert resolved(finding)


def test_the_release_detectors_cost_the_same_queries_with_ten_times_the_runs(clean_redis):
    aborted = canary()
    start(6)  # three stay running on v2
    services.abort(aborted.pk, actor="test", reason="not now")
    v3 = load(3, deploying=None)
    services.deploy(v3, actor="test", reason="try v3", strategy="canary", steps=[50, 100])
    runs = start(8)
    finish(on_version(runs, 3), Run.Status.FAILED)
    finish(on_version(runs, 1), Run.Status.SUCCEEDED)

    def queries() -> tuple[int, int]:
        ctx = detectors.Context()
        with CaptureQueriesContext(connection) as captured:
            found = detectors.run_all(ctx, codes=CODES)
        assert found.checked == CODES and not found.failed
        return len(captured), len(found.detections)

    few, detected = queries()
    assert detected == 2, "runs left on v2, and v3 failing"
    runs = start(40)
    finish(runs[:20], Run.Status.FAILED)
    assert queries()[0] == few


def test_in_flight_deployments_are_read_once_per_tick(clean_redis):
    canary()
    start(4)
    ctx = detectors.Context()
    first = deployment_detectors.in_flight(ctx)
    with CaptureQueriesContext(connection) as again:
        assert deployment_detectors.in_flight(ctx) is first
    assert len(again) == 0


def test_the_findings_page_and_diagnose_explain_a_release_finding(
    clean_redis, client, django_user_model
):
    client.force_login(django_user_model.objects.create_superuser("boss", "b@example.com", "pw"))
    load(1)
    load(2, deploy={"strategy": "blue_green"})
    green = live(Deployment.State.VALIDATING)
    Deployment.objects.filter(pk=green.pk).update(created_at=F("created_at") - timedelta(hours=1))
    watchdog.tick()
    finding = open_finding("deployment_stuck")

    page = client.get("/findings/").content.decode()
    assert finding.title in page
    assert f"manage.py abort_deployment {green.pk} --reason" in page
    out = StringIO()
    call_command("diagnose", stdout=out)
    text = out.getvalue()
    assert finding.title in text
    assert explain.MEANING["deployment_stuck"][:40] in text
    assert re.search(rf"validation run +{green.validation_run_id}\n", text)
