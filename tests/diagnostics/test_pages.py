"""The "Stuck & findings" page, the system report page and findings in the admin."""

import itertools
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnostics import selectors
from diagnostics.models import Finding
from workflows.models import AuditEvent

DEFINITION = {
    "name": "Diagnosed",
    "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
}
_subjects = itertools.count(1)


def make_finding(**fields) -> Finding:
    """A Finding row as the watchdog writes one; ``ago`` sets first_seen that far back."""
    now = timezone.now()
    first_seen = now - timedelta(seconds=fields.pop("ago", 0))
    node_run = fields.get("node_run")
    defaults = {
        "code": "heartbeat_stale",
        "severity": Finding.Severity.WARNING,
        "subject": f"node_run:{node_run.pk}:1" if node_run else f"test:{next(_subjects)}",
        "run": node_run.run if node_run else None,
        "title": "Node has not sent a heartbeat for 30s",
        "suggestion": "The worker is hung or dead; retry the node.",
        "first_seen": first_seen,
        "last_seen": now,
    }
    return Finding.objects.create(**{**defaults, **fields})


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw-for-tests")
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_diagnostics_pages_need_a_staff_login(client, django_user_model):
    for url in ("/findings/", "/system/"):
        response = client.get(url)
        assert response.status_code == 302 and "/login/?next=" in response["Location"]
    client.force_login(django_user_model.objects.create_user("viewer", password="pw"))
    assert client.get("/findings/").status_code == 403
    assert client.get("/system/").status_code == 403


@pytest.mark.django_db
def test_findings_page_groups_open_findings_by_cause_with_their_actions(staff_client, start_run):
    run = start_run(DEFINITION)
    node_a, node_b = run.nodes.order_by("node_key")
    make_finding(
        node_run=node_a,
        severity=Finding.Severity.CRITICAL,
        title="Worker w1 is gone",
        evidence={"worker": "w1", "last_log_lines": ["starting", "batch 3 of 9"]},
        action={"kind": "retry_node", "run": run.pk, "node": "a"},
        ago=90,
    )
    make_finding(node_run=node_b, severity=Finding.Severity.CRITICAL, title="Second stale node")
    make_finding(
        code="no_worker",
        subject="queue:low",
        queue="low",
        title="No worker listens to queue low",
        suggestion="Start a worker for queue low.",
        action={"kind": "command", "command": "manage.py rqworker low"},
    )
    make_finding(code="backlog", title="Resolved long ago", resolved_at=timezone.now())

    response = staff_client.get("/findings/")
    page = response.content.decode()
    assert response.status_code == 200
    groups = response.context["findings"]["groups"]
    assert [(group["code"], group["count"]) for group in groups] == [
        ("heartbeat_stale", 2),
        ("no_worker", 1),
    ]
    assert "Resolved long ago" not in page
    # Run actions lead to the action's preview, where the operator confirms with a reason.
    assert f'href="/runs/{run.pk}/retry/preview/?node=a"' in page
    assert "Retry node (a)…" in page
    assert '<code class="command">manage.py rqworker low</code>' in page
    assert "Start a worker for queue low." in page
    assert "batch 3 of 9" in page and "last_log_lines" in page
    assert "open 1.5 min" in page


@pytest.mark.django_db
def test_findings_page_makes_a_fixed_number_of_queries(staff_client, start_run):
    run = start_run(DEFINITION)
    node = run.nodes.first()
    make_finding(node_run=node)
    with CaptureQueriesContext(connection) as few:
        assert staff_client.get("/findings/").status_code == 200
    for index in range(20):
        make_finding(code=f"code_{index % 4}", subject=f"node_run:{node.pk}:{index}", run=run)
    with CaptureQueriesContext(connection) as many:
        response = staff_client.get("/findings/")
    assert response.context["findings"]["total"] == 21
    assert len(many) == len(few)


@pytest.mark.django_db
def test_findings_page_shows_each_causes_count_and_its_oldest_findings(staff_client):
    """A cause with thousands open (a mass incident) hides neither its count nor the others."""
    shown = selectors.SHOWN_PER_CAUSE
    stale = [make_finding(title=f"stale {n}", ago=1000 - n) for n in range(shown + 5)]
    make_finding(code="job_lost", title="Job gone", ago=5)

    response = staff_client.get("/findings/")
    page = response.content.decode()
    groups = {group["code"]: group for group in response.context["findings"]["groups"]}
    assert response.context["findings"]["total"] == shown + 6
    assert (groups["heartbeat_stale"]["count"], groups["job_lost"]["count"]) == (shown + 5, 1)
    assert [row["id"] for row in groups["heartbeat_stale"]["findings"]] == [
        finding.pk for finding in stale[:shown]
    ]
    assert f"stale {shown - 1}<" in page and f"stale {shown}<" not in page
    assert "…and 5 more heartbeat_stale findings not shown here." in page
    assert "Job gone" in page


@pytest.mark.django_db
def test_system_report_page_makes_a_fixed_number_of_queries(staff_client, start_run):
    run = start_run(DEFINITION)
    node = run.nodes.first()
    make_finding(node_run=node)
    with CaptureQueriesContext(connection) as few:
        assert staff_client.get("/system/").status_code == 200
    for index in range(20):
        make_finding(code=f"code_{index % 4}", subject=f"node_run:{node.pk}:{index}", run=run)
        AuditEvent.objects.create(
            actor="boss", action="clear_queue", target="queue:low", reason="x", before={}
        )
    with CaptureQueriesContext(connection) as many:
        response = staff_client.get("/system/")
    assert 'href="/findings/#cause-code_3"' in response.content.decode()
    assert len(many) == len(few)


@pytest.mark.django_db
def test_findings_page_escapes_text_and_refuses_foreign_links(staff_client):
    make_finding(
        title="<script>alert(1)</script>",
        evidence={"<b>key</b>": "<img src=x onerror=alert(2)>"},
        action={"kind": "open", "url": "javascript:alert(3)", "label": "Look"},
    )
    make_finding(action={"kind": "open", "url": "//evil.example/steal", "label": "Elsewhere"})
    page = staff_client.get("/findings/").content.decode()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<img src=x" not in page and "<b>key</b>" not in page
    assert "javascript:" not in page
    assert "evil.example" not in page


@pytest.mark.django_db
def test_findings_page_says_when_nothing_is_stuck(staff_client):
    page = staff_client.get("/findings/").content.decode()
    assert "Nothing is stuck" in page


@pytest.mark.workers
def test_system_report_page_shows_checks_queues_workers_and_findings(
    staff_client, start_worker, django_user_model
):
    worker = start_worker(queues=("high", "default"))
    make_finding(code="no_worker", subject="queue:low", queue="low")
    response = staff_client.get("/system/")
    page = response.content.decode()
    assert response.status_code == 200
    assert worker.name in page
    assert "✓" in page and "✗" in page  # queue low has no worker
    assert "worker for queue low" in page
    assert 'id="queue-low"' in page
    assert 'href="/findings/#cause-no_worker"' in page
    assert "Clear queue…" in page  # a superuser may operate queues
    assert "********" in page  # SECRET_KEY, masked
    from django.conf import settings

    assert settings.SECRET_KEY not in page


@pytest.mark.django_db
def test_admin_lists_findings_read_only(staff_client, start_run):
    run = start_run(DEFINITION)
    node = run.nodes.first()
    finding = make_finding(node_run=node, evidence={"worker": "w9"})
    make_finding(code="backlog", subject="queue:default", resolved_at=timezone.now())
    AuditEvent.objects.create(
        actor="boss", action="clear_queue", target="queue:low", reason="stale", before={}
    )

    changelist = staff_client.get("/admin/diagnostics/finding/")
    html = changelist.content.decode()
    assert changelist.status_code == 200
    assert f'href="/runs/{run.pk}/"' in html
    open_only = staff_client.get("/admin/diagnostics/finding/?state=open").context["cl"]
    assert [row.pk for row in open_only.result_list] == [finding.pk]
    searched = staff_client.get("/admin/diagnostics/finding/?q=queue:default").context["cl"]
    assert searched.result_count == 1
    assert staff_client.get("/admin/diagnostics/finding/?code=backlog").status_code == 200

    change = staff_client.get(f"/admin/diagnostics/finding/{finding.pk}/change/")
    assert change.status_code == 200
    assert 'name="_save"' not in change.content.decode()  # read-only
    assert staff_client.get("/admin/diagnostics/finding/add/").status_code == 403
    assert staff_client.get("/admin/workflows/auditevent/").status_code == 200


@pytest.mark.django_db
def test_admin_finding_list_makes_a_fixed_number_of_queries(staff_client, start_run):
    run = start_run(DEFINITION)
    node = run.nodes.first()
    make_finding(node_run=node)
    with CaptureQueriesContext(connection) as few:
        staff_client.get("/admin/diagnostics/finding/")
    for index in range(15):
        make_finding(node_run=node, subject=f"node_run:{node.pk}:x{index}")
    with CaptureQueriesContext(connection) as many:
        staff_client.get("/admin/diagnostics/finding/")
    assert len(many) == len(few)
