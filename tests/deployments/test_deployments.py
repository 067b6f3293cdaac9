"""Deployments: which version new runs get, canary and blue-green, rollback, guarded
transitions (workflows/deployments/)."""

import threading
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from django.utils import timezone

from tests.conftest import finished
from workflows import engine, operations
from workflows.definitions import spec, versioning
from workflows.deployments import judging, routing, services
from workflows.models import AuditEvent, Deployment, Run, Workflow

pytestmark = pytest.mark.django_db(transaction=True)


def definition(version: int, **extra) -> dict:
    node = {"type": "test.record", "params": {"value": version}}
    return {"name": "Orders", "slug": "orders", "nodes": {"load": node}, **extra}


def load(version: int, deploying="default", **extra):
    import yaml

    source = yaml.safe_dump(definition(version, **extra), sort_keys=False)
    return versioning.load_definition(source, actor="test", deploy=deploying).version


def start(n: int = 1, params=None) -> list[Run]:
    return [operations.start_run("orders", actor="test", params=params) for _ in range(n)]


def live(state=Deployment.State.ACTIVE) -> Deployment:
    return Deployment.objects.get(workflow__slug="orders", state=state)


def finish(runs, status: str, seconds: float = 1.0) -> None:
    """Give runs an outcome as the engine would record it (the analysis reads only these)."""
    now = timezone.now()
    Run.objects.filter(pk__in=[run.pk for run in runs]).update(
        status=status, started_at=now - timedelta(seconds=seconds), finished_at=now
    )


def test_a_loaded_version_is_deployed_at_once_and_runs_stay_pinned():
    v1 = load(1)
    (first,) = start()
    v2 = load(2)
    (second,) = start()

    assert (first.version, second.version) == (v1, v2)
    first.refresh_from_db()
    assert first.version == v1, "a deployment never re-pins a run"
    assert live().version == v2
    assert Deployment.objects.get(version=v1).state == Deployment.State.SUPERSEDED
    assert list(
        AuditEvent.objects.filter(action=AuditEvent.Action.DEPLOY).values_list("target", flat=True)
    ) == ["workflow:orders", "workflow:orders"]


def test_loading_without_deploying_keeps_new_runs_on_the_live_version():
    v1 = load(1)
    load(2, deploying=None)
    assert start()[0].version == v1


def test_a_canary_gets_exactly_its_share_of_new_runs_in_each_step():
    v1, v2 = load(1), load(2, deploying=None)
    change = services.deploy(v2, actor="test", reason="try v2", strategy="canary", steps=[10, 100])
    assert change.deployment.state == Deployment.State.RAMPING

    runs = start(200)

    on_v2 = [run for run in runs if run.version == v2]
    assert len(on_v2) == 20, "10% of 200 runs, exactly"
    assert {run.deployment_id for run in runs} == {change.deployment.pk}
    assert sum(1 for run in runs[:10] if run.version == v2) == 1, "spread, not bunched"
    assert {run.version for run in runs} == {v1, v2}


def test_a_key_param_keeps_each_key_on_one_version():
    load(1, params={"customer": "x"})
    v2 = load(2, deploying=None, params={"customer": "x"})
    services.deploy(
        v2, actor="test", reason="r", strategy="canary", steps=[50, 100], key_param="customer"
    )
    for key in ("a", "b", "c", "d"):
        versions = {run.version_id for run in start(5, params={"customer": key})}
        assert len(versions) == 1, f"customer {key} stays on one version"
    by_key = {key: start(1, params={"customer": key})[0].version_id for key in map(str, range(40))}
    assert len(set(by_key.values())) == 2, "keys spread over both versions"


def test_a_failing_canary_is_aborted_with_its_evidence_and_new_runs_return_to_the_baseline():
    v1, v2 = load(1), load(2, deploying=None)
    canary = services.deploy(
        v2, actor="test", reason="r", strategy="canary", steps=[20, 100]
    ).deployment
    Deployment.objects.filter(pk=canary.pk).update(min_runs=10)
    runs = start(100)
    finish([r for r in runs if r.version == v1], Run.Status.SUCCEEDED)
    finish([r for r in runs if r.version == v2], Run.Status.FAILED)

    done = judging.advance_in_flight()

    canary.refresh_from_db()
    assert canary.state == Deployment.State.ABORTED
    assert "canary failed 20 of 20 runs" in canary.outcome
    assert canary.evidence["canary"]["failures"] == 20 and canary.evidence["fisher_p"] < 0.05
    assert done and "aborted" in done[0]
    assert live().version == v1
    assert {run.version for run in start(20)} == {v1}
    audit = AuditEvent.objects.get(action=AuditEvent.Action.ABORT_DEPLOYMENT)
    assert (audit.actor, audit.before["state"], audit.after["state"]) == (
        "watchdog",
        "ramping",
        "aborted",
    )


def test_a_healthy_canary_is_promoted_step_by_step_then_takes_every_run():
    v1, v2 = load(1), load(2, deploying=None)
    canary = services.deploy(
        v2, actor="test", reason="r", strategy="canary", steps=[20, 50, 100]
    ).deployment
    Deployment.objects.filter(pk=canary.pk).update(min_runs=5)

    assert judging.advance_in_flight() == [], "no evidence yet: it waits"
    for percent in (20, 50, 100):
        canary.refresh_from_db()
        assert (canary.state, canary.percent) == (Deployment.State.RAMPING, percent)
        finish(start(40), Run.Status.SUCCEEDED)
        assert "promoted" in judging.advance_in_flight()[0]

    canary.refresh_from_db()
    assert canary.state == Deployment.State.ACTIVE
    assert Deployment.objects.get(version=v1).state == Deployment.State.SUPERSEDED
    assert {run.version for run in start(10)} == {v2}


def test_a_canary_with_too_little_evidence_is_not_promoted():
    load(1)
    canary = services.deploy(
        load(2, deploying=None), actor="test", reason="r", strategy="canary", steps=[50, 100]
    ).deployment
    finish(start(10), Run.Status.SUCCEEDED)  # 5 canary runs; min_runs is 20
    assert judging.advance_in_flight() == []
    canary.refresh_from_db()
    assert canary.state == Deployment.State.RAMPING
    assert "5 of the 20" in canary.evidence["reason"]


@pytest.mark.parametrize(("succeed_on", "kept"), [(1, 2), (99, 1)])
def test_blue_green_switches_after_a_good_validation_run_and_keeps_blue_after_a_bad_one(
    start_worker, succeed_on, kept
):
    v1 = load(1)
    v2 = load(
        2,
        deploying=None,
        nodes={"load": {"type": "test.fail_until", "params": {"succeed_on": succeed_on}}},
        deploy={"strategy": "blue_green"},
    )
    green = services.deploy(v2, actor="test", reason="r").deployment
    assert green.state == Deployment.State.VALIDATING and green.strategy == "blue_green"
    assert start()[0].version == v1, "while validating, new runs stay on blue"
    start_worker("simple")
    finished(green.validation_run)

    judging.advance_in_flight()

    green.refresh_from_db()
    assert live().version.number == kept
    if kept == 2:
        assert green.state == Deployment.State.ACTIVE
        assert green.retire_baseline_at > timezone.now() + timedelta(minutes=59)
    else:
        assert green.state == Deployment.State.ABORTED
        assert f"validation run {green.validation_run_id} failed" in green.outcome


def test_twenty_simultaneous_rollbacks_make_one_transition():
    if connection.vendor != "postgresql":
        pytest.skip("concurrent transactions: SQLite runs them one after another anyway")
    load(1), load(2)
    workflow = Workflow.objects.get(slug="orders")
    results, barrier = [], threading.Barrier(20)

    def click():
        try:
            barrier.wait()
            results.append(services.rollback_version(workflow, 1, actor="op", reason="bad v2"))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=click) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(change.changed for change in results) == 1
    assert AuditEvent.objects.filter(action=AuditEvent.Action.ROLLBACK_VERSION).count() == 1
    assert live().version.number == 1
    assert Deployment.objects.filter(state=Deployment.State.ROLLED_BACK).count() == 1


def test_rollback_restarts_the_bad_versions_runs_on_the_chosen_one_linked_to_them():
    v1 = load(1, params={"day": "mon"})
    load(2, params={"day": "mon"})
    stuck = start(3, params={"day": "tue"})
    preview = services.preview_rollback(Workflow.objects.get(slug="orders"), 1)
    assert (preview.from_versions, sorted(preview.queued)) == ([2], sorted(r.pk for r in stuck))

    change = services.rollback_version(
        Workflow.objects.get(slug="orders"), 1, actor="op", reason="v2 is bad", runs="restart"
    )

    assert change.changed and live().version == v1
    for run in stuck:
        run.refresh_from_db()
        assert run.status == Run.Status.CANCELLED and run.version.number == 2
        (again,) = run.restarts.all()
        assert (again.version, again.params, again.deployment) == (v1, run.params, live())


def test_a_run_on_a_chosen_version_is_outside_any_deployment():
    load(1), load(2)
    run = operations.start_run("orders", actor="test", version_number=1)
    assert (run.version.number, run.deployment) == (1, None)
    with pytest.raises(operations.OperationError, match="has no version 7"):
        operations.start_run("orders", actor="test", version_number=7)


def test_commands_deploy_preview_and_roll_back():
    load(1), load(2, deploying=None)
    out = StringIO()
    call_command(
        "deploy_version",
        "orders",
        "2",
        "--strategy",
        "canary",
        "--steps",
        "25,100",
        "--reason",
        "try",
        stdout=out,
    )
    assert "canary on 25% of new runs" in out.getvalue()
    call_command("rollback_version", "orders", "1", "--preview", stdout=out)
    assert "new runs of orders: v2 -> v1" in out.getvalue()
    call_command(
        "abort_deployment", str(live(Deployment.State.RAMPING).pk), "--reason", "no", stdout=out
    )
    call_command("deployments", "orders", stdout=out)
    assert "canary aborted" in out.getvalue()


def test_the_deploy_section_is_checked_with_its_path():
    with pytest.raises(spec.DefinitionError) as error:
        load(1, deploy={"strategy": "canary", "steps": [50, 10]})
    assert "deploy.steps" in str(error.value)
    with pytest.raises(spec.DefinitionError, match=r"deploy\.colour"):
        load(1, deploy={"colour": "blue"})


def test_the_deploy_sections_run_params_are_checked_against_the_declared_ones():
    with pytest.raises(spec.DefinitionError) as error:
        load(
            1,
            params={"customer": "x", "limit": 5},
            deploy={
                "strategy": "blue_green",
                "key_param": "client",
                "smoke_params": {"limit": "five", "region": "eu"},
            },
        )
    problems = dict(error.value.problems)
    assert problems == {
        "deploy.key_param": "names 'client', which is not a declared run param "
        "(params: customer, limit)",
        "deploy.smoke_params.region": "names 'region', which is not a declared run param "
        "(params: customer, limit)",
        "deploy.smoke_params.limit": 'expected an integer (the default is 5), got "five"',
    }
    assert not Workflow.objects.exists(), "a refused definition writes nothing"
    load(
        1,
        params={"customer": "x", "limit": 5},
        deploy={"strategy": "canary", "key_param": "customer", "smoke_params": {"limit": 7}},
    )


def test_deploying_with_an_undeclared_key_param_is_refused_and_writes_nothing():
    load(1, params={"customer": "x"})
    v2 = load(2, deploying=None, params={"customer": "x"})
    audited = AuditEvent.objects.count()

    with pytest.raises(operations.OperationError, match="key_param names 'client', which is not"):
        services.deploy(
            v2, actor="test", reason="r", strategy="canary", steps=[50, 100], key_param="client"
        )
    assert Deployment.objects.filter(version=v2).count() == 0
    assert AuditEvent.objects.count() == audited


def test_routing_of_a_workflow_never_deployed_takes_its_latest_version():
    version = load(1, deploying=None)
    assert routing.version_for_new_run(version.workflow, {}) == (version, None)


# --- Runs left on a version new runs no longer get ----------------------------------------------


def aborted_canary_with_runs() -> tuple[Workflow, list[Run]]:
    """v1 live, v2 a canary aborted with runs still on it; those runs."""
    load(1, params={"day": "mon"})
    v2 = load(2, deploying=None, params={"day": "mon"})
    deployment = services.deploy(
        v2, actor="t", reason="r", strategy="canary", steps=[50, 100]
    ).deployment
    left = [run for run in start(8, params={"day": "tue"}) if run.version == v2]
    services.abort(deployment.pk, actor="t", reason="bad")
    return Workflow.objects.get(slug="orders"), left


def test_runs_left_on_a_version_are_previewed_then_restarted_on_the_live_one_once():
    workflow, left = aborted_canary_with_runs()
    preview = services.preview_runs_left(workflow, 2)
    assert (preview.from_version, preview.to_version, preview.refusal) == (2, 1, "")
    assert sorted(preview.queued) == sorted(run.pk for run in left) and preview.running == []

    change = services.move_runs_off(workflow, 2, actor="op", reason="v2 broke", request_key="k1")

    assert change.changed and change.message == f"{len(left)} run(s) of orders v2 restarted on v1."
    for run in left:
        run.refresh_from_db()
        assert run.status == Run.Status.CANCELLED
        (again,) = run.restarts.all()
        assert (again.version.number, again.params, again.deployment) == (1, run.params, live())
    (event,) = AuditEvent.objects.filter(action=AuditEvent.Action.MOVE_RUNS_OFF)
    assert (event.actor, event.reason, event.target) == ("op", "v2 broke", "workflow:orders")
    assert sorted(event.after["run_ids"]) == sorted(run.pk for run in left)

    repeat = services.move_runs_off(workflow, 2, actor="op", reason="v2 broke", request_key="k1")
    assert not repeat.changed and repeat.message.startswith("Already done")
    again = services.move_runs_off(workflow, 2, actor="op", reason="v2 broke")
    assert (again.changed, again.message) == (False, "No unfinished runs of orders v2.")
    assert Run.objects.filter(restarted_from__isnull=False).count() == len(left)
    assert AuditEvent.objects.filter(action=AuditEvent.Action.MOVE_RUNS_OFF).count() == 1


def test_runs_left_can_be_only_cancelled():
    workflow, left = aborted_canary_with_runs()
    services.move_runs_off(workflow, 2, actor="op", reason="not needed", runs="cancel")
    assert set(
        Run.objects.filter(pk__in=[r.pk for r in left]).values_list("status", flat=True)
    ) == {Run.Status.CANCELLED}
    assert not Run.objects.filter(restarted_from__isnull=False).exists()


def test_runs_cannot_be_moved_off_the_live_version_or_one_being_deployed():
    load(1)
    v2 = load(2, deploying=None)
    deployment = services.deploy(v2, actor="t", reason="r", strategy="canary").deployment
    workflow = Workflow.objects.get(slug="orders")
    start(4)
    cases = [
        (1, "orders v1 is live: new runs get it. Roll back to another version first."),
        (2, "orders v2 is being deployed (canary): abort it, or roll back with --runs restart"),
        (9, "orders has no version 9 (it has v1, v2)."),
    ]
    for number, said in cases:
        with pytest.raises(operations.OperationError) as error:
            services.move_runs_off(workflow, number, actor="op", reason="r")
        assert str(error.value).startswith(said)
    assert services.preview_runs_left(workflow, 2).refusal.startswith(cases[1][1])
    with pytest.raises(operations.OperationError, match="runs must be one of restart, cancel"):
        services.move_runs_off(workflow, 2, actor="op", reason="r", runs="finish")
    with pytest.raises(operations.OperationError, match="A reason is required"):
        services.move_runs_off(workflow, 2, actor="op", reason=" ")
    assert Run.objects.filter(status=Run.Status.CANCELLED).count() == 0
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MOVE_RUNS_OFF).exists()
    assert deployment.pk


def test_moving_runs_needs_the_operate_permission_and_a_refusal_is_audited(django_user_model):
    workflow, left = aborted_canary_with_runs()
    viewer = django_user_model.objects.create_user("viewer")
    with pytest.raises(operations.OperationDenied, match="viewer may not move runs off"):
        services.move_runs_off(workflow, 2, actor=operations.Actor.for_user(viewer), reason="r")
    refusal = AuditEvent.objects.get(action=AuditEvent.Action.MOVE_RUNS_OFF)
    assert refusal.actor == "viewer" and refusal.before["denied"] is True
    assert not Run.objects.filter(pk__in=[r.pk for r in left], status=Run.Status.CANCELLED).exists()


def test_ten_simultaneous_moves_restart_each_run_once():
    if connection.vendor != "postgresql":
        pytest.skip("concurrent transactions: SQLite runs them one after another anyway")
    workflow, left = aborted_canary_with_runs()
    results, barrier = [], threading.Barrier(10)

    def click():
        try:
            barrier.wait()
            results.append(services.move_runs_off(workflow, 2, actor="op", reason="v2 broke"))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=click) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(change.changed for change in results) == 1
    assert Run.objects.filter(restarted_from__isnull=False).count() == len(left)


def test_the_command_previews_and_moves_runs_off_a_version():
    _, left = aborted_canary_with_runs()
    out = StringIO()
    call_command("move_runs_off", "orders", "2", "--preview", stdout=out)
    assert f"{len(left)} unfinished run(s) of orders v2; restarted, they run v1" in out.getvalue()
    assert f"queued: {len(left)}" in out.getvalue()
    assert not Run.objects.filter(status=Run.Status.CANCELLED).exists(), "a preview changes nothing"
    with pytest.raises(CommandError, match="orders v1 is live"):
        call_command("move_runs_off", "orders", "1", "--preview")
    with pytest.raises(CommandError, match="A reason is required"):
        call_command("move_runs_off", "orders", "2")
    call_command("move_runs_off", "orders", "2", "--reason", "v2 broke", stdout=out)
    assert f"{len(left)} run(s) of orders v2 restarted on v1." in out.getvalue()


def test_a_restart_gives_what_the_starter_gave_and_refuses_runs_the_target_cannot_take():
    """v2 added a param: its default stays behind on v1, a value someone chose cannot go."""
    load(1, params={"day": "mon"})
    load(2, params={"day": "mon", "region": "eu"})
    defaulted = operations.start_run("orders", actor="t", params={"day": "tue"})
    chosen = operations.start_run("orders", actor="t", params={"region": "us"})
    workflow = Workflow.objects.get(slug="orders")
    refused = (
        f"1 run(s) cannot start again on v1 with their params (run {chosen.pk}: Unknown run "
        "param(s) region for workflow 'orders' (it declares: day)). Nothing was changed: "
        "cancel them instead, or let them finish."
    )

    with pytest.raises(operations.OperationError) as error:
        services.rollback_version(workflow, 1, actor="op", reason="r", runs="restart")
    assert str(error.value) == refused
    assert live().version.number == 2, "the refused rollback changed nothing"
    services.rollback_version(workflow, 1, actor="op", reason="r")  # the runs finish on v2
    with pytest.raises(operations.OperationError) as error:
        services.move_runs_off(workflow, 2, actor="op", reason="r")
    assert str(error.value) == refused
    assert not Run.objects.filter(status=Run.Status.CANCELLED).exists()

    engine.cancel_run(chosen.pk, actor="op", reason="region us is v2's alone")
    services.move_runs_off(workflow, 2, actor="op", reason="r")
    (moved,) = Run.objects.filter(restarted_from=defaulted)
    assert (moved.version.number, moved.params) == (1, {"day": "tue"})
