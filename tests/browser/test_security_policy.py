"""Every page, the admin's included, works under Keel's Content-Security-Policy in real
Chromium: scripts and styles from /static/ only, nothing refused, htmx still polling; and
fits a phone's screen."""

import pytest

from tests.conftest import finished
from tests.web.conftest import PASSWORD
from workflows import operations

pytestmark = pytest.mark.django_db(transaction=True)

CHAIN = {
    "name": "Policy",
    "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
}


def test_every_page_runs_under_the_policy_with_nothing_refused(
    page, live_server, django_user_model, make_version, worker, browser_errors
):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    version = make_version(CHAIN)
    run = finished(operations.start_run(version.workflow.slug, actor="test"))
    page.goto(f"{live_server.url}/login/?next=/")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")

    paths = [
        "/",
        "/runs/",
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/?node=b",
        "/workflows/",
        f"/workflows/{version.workflow.slug}/",
        "/findings/",
        "/system/",
        "/admin/",
        "/workers/",
        "/logs/?window=all",
        f"/runs/bulk/?action=resume&run={run.pk}",
        f"/workflows/{version.workflow.slug}/?expand=a",
        "/admin/workflows/run/",
        f"/admin/workflows/run/{run.pk}/change/",
        "/admin/workflows/noderun/",
        "/admin/workflows/auditevent/",
    ]
    for path in paths:
        answer = page.goto(f"{live_server.url}{path}")
        assert answer.status == 200, path
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "'unsafe-eval'" not in policy
        page.wait_for_load_state("networkidle")
        if not path.startswith("/admin/"):
            assert page.evaluate("typeof htmx") == "object", f"htmx loaded on {path}"
    # On a phone no page is wider than the screen (tables scroll or stack within it).
    page.set_viewport_size({"width": 390, "height": 844})
    for path in paths:
        page.goto(f"{live_server.url}{path}")
        wider = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wider <= 0, f"{path} is {wider}px wider than a 390px screen"
    assert browser_errors == []
