"""The diagnostics part of the API: findings, and the audited queue actions."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from diagnostics import watchdog
from diagnostics.models import Finding
from tests.api.conftest import Api
from workflows.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)

SINGLE = {"name": "Single", "nodes": {"only": {"type": "test.record"}}}


@pytest.fixture
def queue_operator(django_user_model, token_for, client) -> Api:
    user = django_user_model.objects.create_user("quinn", "quinn@example.com", "pw")
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label__in=["workflows", "diagnostics"],
            codename__in=["view_run", "operate_queues"],
        )
    )
    return Api(client, token_for(user))


@pytest.fixture
def no_worker_finding(clean_redis, start_run, settings):
    """A queued node that no worker listens for: the watchdog opens no_worker."""
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    run = start_run(SINGLE)
    watchdog.tick()
    return run


def test_open_findings_are_listed_with_their_evidence_and_action(api, no_worker_finding):
    response = api.get("findings")

    assert response.status_code == 200
    [finding] = [f for f in response.json()["results"] if f["code"] == "no_worker"]
    assert finding["resolved_at"] is None
    assert finding["queue"] == "default"
    assert finding["suggestion"]
    assert response.json()["next"] is None


def test_findings_filter_by_code_and_run_and_page_by_id(api, no_worker_finding, start_run):
    assert api.get("findings", {"code": "heartbeat_stale"}).json()["results"] == []
    other = start_run(SINGLE)
    assert api.get("findings", {"run": other.pk}).json()["results"] == []

    first = api.get("findings", {"limit": 1}).json()
    assert len(first["results"]) == 1
    if first["next"]:
        second = api.get(first["next"]).json()
        assert all(f["id"] < first["results"][0]["id"] for f in second["results"])


def test_recent_findings_are_the_open_ones_and_those_resolved_within_a_day(api):
    now = timezone.now()

    def finding(subject, *, seen_ago_hours, resolved_ago_hours=None):
        seen = now - timedelta(hours=seen_ago_hours)
        resolved = resolved_ago_hours is not None
        return Finding.objects.create(
            code="heartbeat_stale",
            subject=subject,
            title=subject,
            suggestion="Retry it.",
            first_seen=seen - timedelta(hours=1),
            last_seen=seen,
            resolved_at=now - timedelta(hours=resolved_ago_hours) if resolved else None,
        )

    finding("open, the watchdog stopped two days ago", seen_ago_hours=48)
    finding("resolved an hour ago", seen_ago_hours=1, resolved_ago_hours=1)
    finding("resolved two days ago", seen_ago_hours=48, resolved_ago_hours=48)

    recent = api.get("findings", {"state": "recent"}).json()["results"]
    assert [f["title"] for f in recent] == [
        "resolved an hour ago",
        "open, the watchdog stopped two days ago",
    ]
    opened = api.get("findings").json()["results"]
    assert [f["title"] for f in opened] == ["open, the watchdog stopped two days ago"]


def test_a_viewer_without_run_permission_sees_no_findings(client, nobody, token_for):
    assert Api(client, token_for(nobody)).get("findings").status_code == 403


def test_clearing_a_queue_removes_its_jobs_and_is_audited(queue_operator, clean_redis, start_run):
    start_run(SINGLE)  # no worker: its job waits in default

    response = queue_operator.post("queues/default/clear", {"reason": "poisoned jobs"})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["changed"] is True
    assert body["before"]["queued"] == 1 and body["after"]["queued"] == 0
    event = AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).get()
    assert (event.actor, event.reason) == ("quinn", "poisoned jobs")
    again = queue_operator.post("queues/default/clear", {"reason": "double click"})
    assert again.status_code == 200 and again.json()["changed"] is False


def test_queue_actions_need_the_permission_a_known_queue_and_a_reason(api, queue_operator):
    refused = api.post("queues/default/clear", {"reason": "x"})
    assert refused.status_code == 403 and "diagnostics.operate_queues" in refused.content.decode()
    [denial] = AuditEvent.objects.exclude(
        action=AuditEvent.Action.DEPLOY
    ).all()  # the refusal is audited
    assert (denial.action, denial.target, denial.before["denied"]) == (
        "clear_queue",
        "queue:default",
        True,
    )
    unknown = queue_operator.post("queues/nope/requeue-failed", {"reason": "x"})
    assert unknown.status_code == 404
    assert "Keel's queues are" in unknown.json()["error"]["message"]
    assert queue_operator.post("queues/default/clear", {}).status_code == 400
