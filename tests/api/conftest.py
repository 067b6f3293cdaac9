"""Fixtures for the JSON API: users with and without permissions, their tokens, a client
that speaks JSON with a bearer token, and runs in known states (driven through the
engine exactly as a worker would, so no worker is needed unless a test starts one)."""

import json

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from workflows import engine
from workflows.api import auth
from workflows.models import NodeRun, Run

CHAIN = {
    "name": "Chain",
    "params": {"day": "2026-01-01"},
    "nodes": {
        "a": {"type": "test.effect", "params": {"value": 1}},
        "b": {"type": "test.effect", "params": {"value": 2}, "after": ["a"]},
        "c": {"type": "test.effect", "params": {"value": 3}, "after": ["b"]},
    },
}


def nodes(run) -> dict[str, NodeRun]:
    return {node.node_key: node for node in NodeRun.objects.filter(run=run)}


def work(run, key, *, output=None, fail: str | None = None, checkpoint=None, logs=()) -> None:
    """Do what a worker does for the node's current attempt."""
    from workflows.models import LogLine, NodeAttempt

    node = nodes(run)[key]
    claim = engine.claim_attempt(node.pk, node.attempt, worker="w1", pid=1, host="h1")
    assert claim is not None, f"{key} could not be claimed ({node.status} {node.attempt})"
    attempt = NodeAttempt.objects.get(node_run=node, number=node.attempt)
    for seq, message in enumerate(logs, start=1):
        LogLine.objects.create(
            attempt=attempt, seq=seq, at=attempt.started_at, level="INFO", message=message
        )
    if checkpoint is not None:
        engine.save_progress_checkpoint(
            node.pk, run.pk, node.attempt, engine.next_checkpoint_sequence(node.pk), checkpoint
        )
    if fail:
        engine.fail_attempt(node.pk, node.attempt, engine.Failure(fail, "boom", retryable=False))
    else:
        engine.complete_attempt(
            node.pk, node.attempt, output if output is not None else {"key": key}
        )


class Api:
    """A JSON client for /api/v1/ with a bearer token (or a session, with ``client``)."""

    def __init__(self, client: Client, token: str | None = None):
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, params: dict | None = None, **headers):
        return self.client.get(_url(path), params or {}, headers={**self.headers, **headers})

    def post(self, path: str, body=None, *, raw: str | None = None, **headers):
        data = raw if raw is not None else json.dumps(body if body is not None else {})
        return self.client.post(
            _url(path), data, content_type="application/json", headers={**self.headers, **headers}
        )


def _url(path: str) -> str:
    return path if path.startswith("/") else f"/api/v1/{path}"


def make_user(django_user_model, username: str, *permissions: str):
    user = django_user_model.objects.create_user(username, f"{username}@example.com", "pw")
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="workflows", codename__in=permissions)
    )
    return user


@pytest.fixture
def operator(django_user_model):
    return make_user(django_user_model, "olga", "view_run", "operate_run")


@pytest.fixture
def viewer(django_user_model):
    return make_user(django_user_model, "vic", "view_run")


@pytest.fixture
def nobody(django_user_model):
    return make_user(django_user_model, "nina")


@pytest.fixture
def token_for(db):
    def make(user, name: str = "tests") -> str:
        return auth.create_token(user, name)[1]

    return make


@pytest.fixture
def api(client, operator, token_for) -> Api:
    return Api(client, token_for(operator))


@pytest.fixture
def viewer_api(token_for, viewer) -> Api:
    return Api(Client(), token_for(viewer))


@pytest.fixture
def failed_chain(start_run):
    """a succeeded, b failed after a progress checkpoint (with two log lines), c never ran."""
    run = start_run(CHAIN)
    work(run, "a", output={"a": 1})
    work(run, "b", checkpoint={"offset": 500}, fail="ValueError", logs=["reading", "<b>boom</b>"])
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    return run


@pytest.fixture
def succeeded_chain(start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key)
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    return run
