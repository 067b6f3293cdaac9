"""Every dashboard page renders, needs a login and the view permission, and the admin links
each run to its dashboard page."""

import re

import pytest
from django.test import Client

from tests.web.conftest import CHAIN, user_with
from workflows.models import Checkpoint

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw-for-tests")
    client.force_login(user)
    return client


def page_urls(run, checkpoint) -> list[str]:
    return [
        "/",
        "/workflows/",
        "/workflows/chain/",
        "/workflows/chain/diff/",
        "/runs/",
        "/runs/?status=failed&workflow=chain&version=1&range=24h",
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/?node=b&attempt=1&log_page=1",
        f"/runs/{run.pk}/live/",
        f"/runs/{run.pk}/resume/preview/",
        f"/runs/{run.pk}/retry/preview/?node=b",
        f"/runs/{run.pk}/rollback/preview/",
        f"/runs/{run.pk}/rollback/preview/?to_checkpoint={checkpoint.pk}",
        f"/runs/{run.pk}/rollback/preview/?to_node=b",
        f"/runs/{run.pk}/cancel/preview/",
        f"/runs/{run.pk}/skip/preview/?node=c",
        f"/runs/{run.pk}/mark-succeeded/preview/?node=b",
    ]


def test_every_page_renders(staff_client, failed_run):
    checkpoint = Checkpoint.objects.filter(run=failed_run).first()
    for url in page_urls(failed_run, checkpoint):
        response = staff_client.get(url)
        # The live partial of a finished run answers 286: htmx stops polling.
        assert response.status_code == (286 if "/live/" in url else 200), url
        assert b"Traceback (most recent call last)" not in response.content, url


def test_pages_need_a_login(client, failed_run):
    checkpoint = Checkpoint.objects.filter(run=failed_run).first()
    for url in page_urls(failed_run, checkpoint):
        response = client.get(url)
        if "/live/" in url:  # polled: says "signed out" and stops the polling instead
            assert response.status_code == 286 and b"signed out" in response.content
            continue
        assert response.status_code == 302, url
        assert "/login/" in response["Location"], url


def test_pages_need_the_view_permission(django_user_model, failed_run):
    client = Client()
    client.force_login(user_with(django_user_model, "nobody"))
    for url in ["/", "/workflows/", "/workflows/chain/", "/runs/", f"/runs/{failed_run.pk}/"]:
        assert client.get(url).status_code == 403, url
    assert client.get(f"/runs/{failed_run.pk}/live/").status_code == 403


def test_missing_things_are_404(staff_client, make_version):
    make_version(CHAIN)
    assert staff_client.get("/runs/999999/").status_code == 404
    assert staff_client.get("/runs/999999/live/").status_code == 404
    assert staff_client.get("/workflows/nope/").status_code == 404
    assert staff_client.get("/workflows/chain/diff/?from=1&to=7").status_code == 404


def test_viewer_sees_no_action_buttons(viewer_client, failed_run):
    page = viewer_client.get(f"/runs/{failed_run.pk}/").content.decode()
    assert "/resume/preview/" not in page and "/retry/preview/" not in page
    assert "You can look but not act" in page


def test_the_page_loads_only_the_apps_own_assets(staff_client, failed_run):
    """No CDN, no web font: the dashboard works with no network beyond the app."""
    page = staff_client.get(f"/runs/{failed_run.pk}/").content.decode()
    assert '<script src="/static/vendor/htmx.min.js" defer></script>' in page
    for tag in ('src="http', 'src="//', 'href="http', 'href="//', "@import"):
        assert tag not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    htmx = staff_client.get("/static/vendor/htmx.min.js")
    assert htmx.status_code == 200
    assert b"htmx 2.0.11" in b"".join(htmx.streaming_content)[:300]


def test_admin_lists_runs_and_links_to_the_dashboard(staff_client, start_run):
    run = start_run(CHAIN)
    changelist = staff_client.get("/admin/workflows/run/").content.decode()
    assert f'href="/runs/{run.pk}/"' in changelist
    for model in (
        "workflow",
        "workflowversion",
        "noderun",
        "nodeattempt",
        "runevent",
        "resourcepool",
    ):
        assert staff_client.get(f"/admin/workflows/{model}/").status_code == 200
    node_run = run.nodes.first()
    assert staff_client.get(f"/admin/workflows/noderun/{node_run.pk}/change/").status_code == 200
    assert staff_client.get(f"/admin/workflows/run/{run.pk}/change/").status_code == 200


def test_admin_lists_of_big_tables_never_read_a_whole_table_for_their_filters(
    staff_client, start_run
):
    """At a million node runs a DISTINCT over the table for each filter's choices, or a
    second full count, took most of a second: the filters know their choices (queues
    from the settings, pools from their table, codes from the detectors)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    run = start_run(CHAIN)
    for url in (
        "/admin/workflows/run/",
        "/admin/workflows/noderun/",
        "/admin/workflows/nodeattempt/",
        "/admin/diagnostics/finding/",
    ):
        with CaptureQueriesContext(connection) as queries:
            page = staff_client.get(url)
        assert page.status_code == 200
        sql = [q["sql"].upper() for q in queries.captured_queries]
        assert not [q for q in sql if "DISTINCT" in q], url
        assert len([q for q in sql if "COUNT(*)" in q]) <= 1, url

    listed = staff_client.get("/admin/workflows/noderun/").content.decode()
    for queue in ("high", "default", "low"):
        assert f'href="?queue={queue}"' in listed, "the queue filter offers every queue"
    [queue] = {node.queue for node in run.nodes.all()}
    other = next(q for q in ("high", "default", "low") if q != queue)
    count = run.nodes.count()
    assert (
        f"{count} node runs"
        in staff_client.get(f"/admin/workflows/noderun/?queue={queue}").content.decode()
    )
    assert (
        "0 node runs"
        in staff_client.get(f"/admin/workflows/noderun/?queue={other}").content.decode()
    )


def test_workflow_page_shows_reliability_for_the_chosen_window(staff_client, failed_run):
    page = staff_client.get(f"/workflows/{failed_run.workflow.slug}/?window=30d").content.decode()
    assert "Reliability" in page and "last 30d" in page
    assert (
        "100.0%" in page and "1 failed, 0 succeeded" in page and "over the same 1 failure" in page
    )


def test_an_operator_who_is_not_staff_signs_in_on_keels_own_page(client, django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("ops", password="a-long-passphrase")
    user.user_permissions.add(Permission.objects.get(codename="view_run"))
    assert not user.is_staff
    wrong = client.post("/login/", {"username": "ops", "password": "nope", "next": "/"})
    assert "didn't match" in wrong.content.decode()
    right = client.post(
        "/login/", {"username": "ops", "password": "a-long-passphrase", "next": "/runs/"}
    )
    assert right.status_code == 302 and right["Location"] == "/runs/"
    assert client.get("/runs/").status_code == 200


def test_every_answer_carries_the_content_security_policy(client, admin_user):
    client.force_login(admin_user)
    for path in ("/", "/admin/", "/api/v1/runs", "/login/"):
        policy = client.get(path).headers["Content-Security-Policy"]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy, path


def nav_links(html: str) -> list[str]:
    nav = html[html.index('<nav aria-label="Main">') : html.index("</nav>")]
    return re.findall(r">([A-Z][a-z]+)</a>", nav)


def test_the_menu_shows_only_what_the_user_may_open(viewer_client, client, django_user_model):
    assert nav_links(viewer_client.get("/").content.decode()) == [
        "Overview",
        "Workflows",
        "Runs",
        "Logs",
    ]
    staff = django_user_model.objects.create_user("sam", password="pw", is_staff=True)
    client.force_login(staff)
    refused = client.get("/")  # staff without the view permission

    assert nav_links(refused.content.decode()) == ["Findings", "System", "Workers", "Admin"]
    assert refused.status_code == 403


def test_a_refusal_names_the_missing_permission_and_who_is_signed_in(client, django_user_model):
    nobody = django_user_model.objects.create_user("nina", password="pw")
    client.force_login(nobody)

    runs = client.get("/runs/")
    findings = client.get("/findings/")

    assert runs.status_code == findings.status_code == 403
    page = runs.content.decode()
    assert "Seeing runs needs the workflows.view_run permission." in page
    assert "signed in as <strong>nina</strong>" in page
    assert "Diagnostics pages are for staff accounts (is_staff)." in findings.content.decode()
    assert nav_links(page) == []
