"""Clear a queue, requeue failed jobs: confirm, reason, permission, audit, idempotence."""

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from rq.registry import FailedJobRegistry

from diagnostics import operations
from tests.conftest import wait_for
from workflows import audit
from workflows.models import AuditEvent
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

LOW = {
    "name": "Queued low",
    "nodes": {key: {"type": "keel.noop", "priority": "low"} for key in ("a", "b", "c")},
}
CLEAR = "/system/queues/low/clear/"
REQUEUE = "/system/queues/low/requeue-failed/"


def low_queue():
    return dispatch.get_queue("low")


def failed_on_low() -> int:
    return FailedJobRegistry(queue=low_queue()).get_job_count(cleanup=False)


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate_queues"))
    return user


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def three_jobs_on_low(clean_redis, start_run):
    start_run(LOW)  # no worker listens to "low": its three root nodes wait there
    assert low_queue().count == 3


def test_clear_queue_asks_to_confirm_then_clears_and_audits(operator_client, three_jobs_on_low):
    preview = operator_client.post(CLEAR)
    html = preview.content.decode()
    assert preview.status_code == 200
    assert "<strong>3</strong> job(s) waiting in queue low will be removed." in html
    assert 'name="reason"' in html and 'name="confirm" value="yes"' in html
    assert (
        low_queue().count == 3
        and not AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).exists()
    )

    done = operator_client.post(
        CLEAR, {"confirm": "yes", "reason": "stale messages after a deploy"}, follow=True
    )
    assert done.redirect_chain == [("/system/", 302)]
    assert "Cleared 3 job(s) from queue low." in done.content.decode()
    assert low_queue().count == 0
    (event,) = AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).all()
    assert (event.actor, event.action, event.target) == ("op", "clear_queue", "queue:low")
    assert event.reason == "stale messages after a deploy"
    assert event.before == {"queued": 3, "failed": 0}
    assert event.after == {"queued": 0, "failed": 0, "removed": 3}
    assert "stale messages after a deploy" in done.content.decode()  # recent actions table


def test_clearing_twice_changes_nothing_the_second_time(operator_client, three_jobs_on_low):
    data = {"confirm": "yes", "reason": "double click"}
    operator_client.post(CLEAR, data)
    again = operator_client.post(CLEAR, data, follow=True)
    assert "Queue low was already empty." in again.content.decode()
    assert AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).count() == 1


def test_a_reason_is_required(operator_client, three_jobs_on_low):
    response = operator_client.post(CLEAR, {"confirm": "yes", "reason": "   "})
    assert response.status_code == 200
    assert "A reason is required." in response.content.decode()
    assert (
        low_queue().count == 3
        and not AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).exists()
    )
    with pytest.raises(operations.QueueOperationError, match="reason is required"):
        operations.clear_queue("low", actor=response.wsgi_request.user, reason="")


def test_queue_actions_need_the_permission(client, django_user_model, three_jobs_on_low):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)
    assert "Clear queue…" not in client.get("/system/").content.decode()
    for url in (CLEAR, REQUEUE):
        assert client.post(url, {"confirm": "yes", "reason": "try"}).status_code == 403
    assert low_queue().count == 3
    with pytest.raises(operations.QueuePermissionDenied, match=r"diagnostics\.operate_queues"):
        operations.clear_queue("low", actor=staff, reason="from a script")
    # Each refusal is audited; a burst of the same one is one row with a count.
    refusals = {
        (e.action, e.target): e
        for e in AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).all()
    }
    assert set(refusals) == {("clear_queue", "queue:low"), ("requeue_failed", "queue:low")}
    cleared = refusals["clear_queue", "queue:low"]
    assert cleared.actor == "staff" and cleared.reason == "try"
    assert cleared.before == {"denied": True, "missing_permission": "diagnostics.operate_queues"}
    assert cleared.after == {"refused_again": 1}
    assert refusals["requeue_failed", "queue:low"].after == {}


def test_a_refusal_after_the_counting_window_is_a_row_of_its_own(django_user_model):
    staff = django_user_model.objects.create_user("script", password="pw", is_staff=True)
    for _ in range(50):
        with pytest.raises(operations.QueuePermissionDenied):
            operations.clear_queue("low", actor=staff, reason="loop")
    [event] = AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).all()
    assert event.after == {"refused_again": 49}
    AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).update(
        at=event.at - audit.REFUSALS_COUNTED_FOR
    )
    with pytest.raises(operations.QueuePermissionDenied):
        operations.clear_queue("low", actor=staff, reason="loop")
    assert AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).count() == 2


def test_queue_actions_are_post_only_and_csrf_protected(operator, operator_client, clean_redis):
    assert operator_client.get(CLEAR).status_code == 405
    assert operator_client.get(REQUEUE).status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(operator)
    assert strict.post(CLEAR, {"confirm": "yes", "reason": "no token"}).status_code == 403
    page = strict.get("/system/").content.decode()
    assert page.count('name="csrfmiddlewaretoken"') >= 6  # two forms per Keel queue


def test_unknown_queue_is_not_found(operator_client, clean_redis):
    response = operator_client.post("/system/queues/nope/clear/", {"confirm": "yes", "reason": "x"})
    assert response.status_code == 404


@pytest.mark.workers
def test_requeue_failed_jobs_puts_them_back_on_their_queue(operator_client, start_worker):
    worker = start_worker(queues=("low",))
    for _ in range(2):
        low_queue().enqueue("builtins.int", "not a number")  # fails on the worker
    wait_for(lambda: failed_on_low() == 2, message="two failed jobs")
    worker.stop()  # so that requeued jobs stay visible on the queue

    preview = operator_client.post(REQUEUE)
    assert "<strong>2</strong> failed job(s) of queue low will be put back" in (
        preview.content.decode()
    )
    done = operator_client.post(REQUEUE, {"confirm": "yes", "reason": "bug fixed"}, follow=True)
    assert "Requeued 2 failed job(s) on queue low." in done.content.decode()
    assert failed_on_low() == 0 and low_queue().count == 2
    (event,) = AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).all()
    assert event.action == "requeue_failed"
    assert event.before == {"queued": 0, "failed": 2}
    assert event.after == {"queued": 2, "failed": 0, "requeued": 2, "expired": 0}

    again = operator_client.post(REQUEUE, {"confirm": "yes", "reason": "bug fixed"}, follow=True)
    assert "Queue low has no failed job to requeue." in again.content.decode()
    assert AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).count() == 1


def test_django_rqs_unaudited_pages_are_not_served(client, admin_user):
    client.force_login(admin_user)  # a superuser, who could empty a queue there

    for path in ("/django-rq/", "/django-rq/queues/0/empty/", "/django-rq/stats.json"):
        assert client.get(path).status_code == 404, path
