"""Fixtures for the dashboard tests: users with and without permissions, and runs in
chosen states, driven through the engine as a worker would drive it (no worker needed)."""

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from workflows import engine
from workflows.models import LogLine, NodeAttempt, NodeRun, Run

PASSWORD = "pw-for-tests"

CHAIN = {
    "name": "Chain",
    "slug": "chain",
    "nodes": {
        "a": {"type": "test.effect", "params": {"value": 1}},
        "b": {"type": "test.effect", "params": {"value": 2}, "after": ["a"]},
        "c": {"type": "test.effect", "params": {"value": 3}, "after": ["b"]},
    },
}


def nodes(run) -> dict[str, NodeRun]:
    return {n.node_key: n for n in NodeRun.objects.filter(run=run)}


def work(
    run, key, *, output=None, fail: str | None = None, message="boom", checkpoint=None, logs=()
):
    """Do what a worker does for the node's current attempt."""
    node = nodes(run)[key]
    claim = engine.claim_attempt(node.pk, node.attempt, worker="w-1", pid=4242, host="host-1")
    assert claim is not None, f"{key} could not be claimed ({node.status} attempt {node.attempt})"
    attempt = NodeAttempt.objects.get(node_run=node, number=node.attempt)
    LogLine.objects.bulk_create(
        [
            LogLine(attempt=attempt, seq=number, at=attempt.started_at, level="INFO", message=line)
            for number, line in enumerate(logs, start=1)
        ]
    )
    if checkpoint is not None:
        engine.save_progress_checkpoint(
            node.pk, run.pk, node.attempt, engine.next_checkpoint_sequence(node.pk), checkpoint
        )
    if fail:
        engine.fail_attempt(
            node.pk,
            node.attempt,
            engine.Failure(fail, message, retryable=False, traceback=f"Traceback: {message}"),
        )
    else:
        engine.complete_attempt(
            node.pk, node.attempt, output if output is not None else {"key": key}
        )


def user_with(django_user_model, username: str, *codenames: str):
    user = django_user_model.objects.create_user(username, f"{username}@example.com", PASSWORD)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="workflows", codename__in=codenames)
    )
    return user


@pytest.fixture
def operator(django_user_model):
    return user_with(django_user_model, "olga", "view_run", "operate_run")


@pytest.fixture
def viewer(django_user_model):
    return user_with(django_user_model, "victor", "view_run")


@pytest.fixture
def operator_client(operator):
    client = Client()
    client.force_login(operator)
    return client


@pytest.fixture
def viewer_client(viewer):
    client = Client()
    client.force_login(viewer)
    return client


@pytest.fixture
def failed_run(start_run):
    """a succeeded, b failed after a checkpoint, c never ran: the run failed."""
    run = start_run(CHAIN)
    work(run, "a", output={"a": 1}, logs=["a starts", "a done"])
    work(run, "b", checkpoint={"offset": 500}, fail="ValueError", message="bad row 501")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    return run


@pytest.fixture
def succeeded_run(start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key, output={"from": key})
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    return run
