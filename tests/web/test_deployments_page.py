"""The release panel of the workflow page, its actions (deploy, promote, abort, roll back
a version) and uploading a definition: what each state shows, each action changing
once, refused without the permission, errors said on the page; the page's queries do
not grow with the runs."""

import hashlib
import re
from datetime import timedelta
from html import escape, unescape

import pytest
import yaml
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from workflows import operations
from workflows.definitions import versioning
from workflows.deployments import analysis, judging, selectors, services
from workflows.models import AuditEvent, Deployment, Run, Workflow

pytestmark = pytest.mark.django_db

PAGE = "/workflows/orders/"


def source(version: int, **extra) -> str:
    node = {"type": "test.record", "params": {"value": version}}
    definition = {"name": "Orders", "slug": "orders", "nodes": {"load": node}, **extra}
    return yaml.safe_dump(definition, sort_keys=False)


def load(version: int, deploying="default", **extra):
    return versioning.load_definition(
        source(version, **extra), actor="test", deploy=deploying
    ).version


def start(n: int = 1) -> list[Run]:
    return [operations.start_run("orders", actor="test") for _ in range(n)]


def finish(runs, status: str, seconds: float = 1.0, hours_ago: float = 0) -> None:
    """Give runs an outcome as the engine would record it (what the panel reads)."""
    end = timezone.now() - timedelta(hours=hours_ago)
    Run.objects.filter(pk__in=[run.pk for run in runs]).update(
        status=status, started_at=end - timedelta(seconds=seconds), finished_at=end
    )


def canary(steps=(10, 100), min_runs=20) -> Deployment:
    """v1 live, v2 a canary on the first step."""
    load(1)
    v2 = load(2, deploying=None)
    deployment = services.deploy(
        v2, actor="test", reason="try v2", strategy="canary", steps=list(steps), min_runs=min_runs
    ).deployment
    return deployment


def failing_canary() -> Deployment:
    """A canary whose 20 runs all failed, aborted by the watchdog's step."""
    deployment = canary(steps=(20, 100), min_runs=10)
    runs = start(100)
    finish([r for r in runs if r.version.number == 1], Run.Status.SUCCEEDED)
    finish([r for r in runs if r.version.number == 2], Run.Status.FAILED)
    assert "aborted" in judging.advance_in_flight()[0]
    deployment.refresh_from_db()
    return deployment


def page(client, url=PAGE) -> str:
    response = client.get(url)
    assert response.status_code == 200, url
    return response.content.decode()


def followed(response) -> str:
    """The page a redirect led to, with its messages."""
    assert response.status_code == 200, response.status_code
    return response.content.decode()


# --- What the panel shows ----------------------------------------------------------------------


def test_with_nothing_in_flight_the_panel_says_which_version_new_runs_get(operator_client):
    load(1)
    load(2)
    html = page(operator_client)
    assert 'id="release"' in html
    assert "All new runs on v2." in html
    assert "Live: v2, immediate, by test" in html
    assert 'class="dep-state s-superseded"' in html and 'class="dep-state s-active"' in html
    assert "Canary against baseline" not in html and 'role="alert"' not in html
    assert "Deploy a version" in html and "Roll back to v1…" in html


def test_a_canary_in_flight_shows_its_split_its_numbers_and_its_last_analysis(operator_client):
    deployment = canary(steps=(10, 50, 100), min_runs=50)
    runs = start(100)
    on_v2 = [r for r in runs if r.version.number == 2]
    finish(on_v2[:3], Run.Status.FAILED, seconds=4)
    finish(on_v2[3:], Run.Status.SUCCEEDED, seconds=2)
    finish([r for r in runs if r.version.number == 1], Run.Status.SUCCEEDED, seconds=1)
    assert judging.advance_in_flight() == []  # 10 of 50 runs: it waits, keeping the evidence

    html = page(operator_client)

    assert "v2 canary 10% · v1 90%" in html
    assert "Canary step 1 of 3" in html and "<strong>10%</strong> → 50% → 100%" in html
    compare = html.split('class="release-compare"')[1].split("</table>")[0]
    assert 'v2 canary</strong></td><td class="num">10</td><td class="num">3</td>' in compare
    assert "30.0%" in compare and "4.00s" in compare
    assert 'v1 baseline</strong></td><td class="num">90</td><td class="num">0</td>' in compare
    assert "last analysis · step at 10%: wait" in html
    assert "canary has 10 of the 50 finished runs needed for a verdict" in html
    assert f'action="/deployments/{deployment.pk}/promote/"' in html
    assert f'action="/deployments/{deployment.pk}/abort/"' in html
    assert "Deploy a version" not in html, "one deployment in flight at a time"
    targets = html.split('<select name="to">')[1].split("</select>")[0]
    assert '<option value="1">' in targets, "back to the baseline: aborts the canary"
    assert '<option value="2">' not in targets, "never to the version being deployed"


def test_a_blue_green_validation_shows_its_run_and_that_new_runs_stay(operator_client):
    load(1)
    v2 = load(2, deploying=None)
    deployment = services.deploy(v2, actor="test", reason="r", strategy="blue_green").deployment
    html = page(operator_client)
    assert f"v2 validating (run #{deployment.validation_run_id}) · all new runs on v1" in html
    assert f'href="/runs/{deployment.validation_run_id}/"' in html


def test_an_aborted_canary_shows_why_keel_aborted_it(operator_client):
    deployment = failing_canary()
    html = page(operator_client)
    alert = html.split('class="error-box release-ended" role="alert"')[1].split("</div>")[0]
    assert "v2 canary aborted" in alert and "by watchdog" in alert
    assert f"Why: {escape(deployment.outcome)}" in alert
    assert "canary failed 20 of 20 runs (100.0%)" in alert
    assert "What it was judged on" in html
    assert f"Fisher's exact p={deployment.evidence['fisher_p']:#.3g}" in html
    assert "All new runs on v1." in html


def test_a_rollback_is_shown_with_its_reason_until_the_next_deployment(operator_client):
    load(1)
    load(2)
    services.rollback_version(Workflow.objects.get(slug="orders"), 1, actor="op", reason="v2 slow")
    html = page(operator_client)
    assert "v2 immediate rolled back" in html and "Why: rolled back to v1: v2 slow" in html
    load(3)
    assert "release-ended" not in page(operator_client), "a newer deployment took over"


def status_url(html: str) -> str:
    """The release status's poll, as the page gives it to htmx."""
    part = html.split('id="release-status"')[1].split(">")[0]
    assert 'hx-trigger="every 5s"' in part, part
    return unescape(part.split('hx-get="')[1].split('"')[0])


def test_the_release_state_updates_itself_while_a_canary_is_in_flight(operator_client):
    deployment = canary(steps=(10, 50, 100), min_runs=50)
    url = status_url(page(operator_client))
    runs = start(20)
    finish([r for r in runs if r.version.number == 2], Run.Status.FAILED, seconds=4)

    polled = operator_client.get(url)

    assert polled.status_code == 200, "it keeps polling while the same step is in flight"
    html = polled.content.decode()
    compare = html.split('class="release-compare"')[1].split("</table>")[0]
    assert 'v2 canary</strong></td><td class="num">2</td><td class="num">2</td>' in compare
    assert status_url(html) == url and "release-moved" not in html
    assert "<form" not in html and "release-chart" not in html, "only the state is polled"

    services.promote(deployment.pk, actor="op", reason="looks fine", expected_step=0)
    polled = operator_client.get(url)
    assert polled.status_code == 286, "the page's forms were made for step 1: polling stops"
    html = polled.content.decode()
    assert "v2 canary is at step 2 of 3 (50%) now." in html and "Reload the page" in html
    assert "hx-get" not in html
    assert "v2 canary 50% · v1 50%" in html


def test_the_release_state_says_when_the_watchdog_aborted_the_canary(operator_client):
    url = status_url(_page_with_canary(operator_client))
    runs = start(100)
    finish([r for r in runs if r.version.number == 1], Run.Status.SUCCEEDED)
    finish([r for r in runs if r.version.number == 2], Run.Status.FAILED)
    assert "aborted" in judging.advance_in_flight()[0]

    polled = operator_client.get(url)

    assert polled.status_code == 286
    html = polled.content.decode()
    assert "v2 canary is aborted now." in html
    assert "v2 canary aborted" in html and "by watchdog" in html and "All new runs on v1." in html


def _page_with_canary(client) -> str:
    canary(steps=(20, 100), min_runs=10)
    return page(client)


def test_nothing_in_flight_means_no_polling(operator_client):
    load(1)
    html = page(operator_client)
    assert (
        'id="release-status">' in html
        and "hx-trigger" not in html.split('id="release-status"')[1].split(">")[0]
    )


def test_the_release_state_needs_a_login_and_the_view_permission(client, django_user_model):
    deployment = canary()
    url = f"/workflows/orders/release/?shown={deployment.pk}:ramping:0"

    signed_out = client.get(url)
    assert signed_out.status_code == 286, "a login page swapped into the panel would confuse"
    assert "You were signed out" in signed_out.content.decode()
    assert "v2 canary" not in signed_out.content.decode()

    nobody = django_user_model.objects.create_user("nobody", password="pw")
    client.force_login(nobody)
    assert client.get(url).status_code == 403
    assert client.get("/workflows/missing/release/").status_code == 404


def test_a_viewer_sees_the_panel_but_no_forms(viewer_client):
    canary()
    html = page(viewer_client)
    assert "v2 canary 10% · v1 90%" in html
    assert "/promote/" not in html and "/abort/" not in html and "/deploy/" not in html
    assert "rollback-version" not in html
    assert (
        "Deploying, promoting, aborting and rolling back need the "
        "<code>workflows.operate_run</code> permission." in html
    )


def test_the_trend_gives_each_version_its_hourly_failure_rate_and_p95():
    load(1)
    v2 = load(2, deploying=None)
    services.deploy(v2, actor="test", reason="r", strategy="canary", steps=[50, 100])
    runs = start(40)
    on = {
        1: [r for r in runs if r.version.number == 1],
        2: [r for r in runs if r.version.number == 2],
    }
    finish(on[1][:10], Run.Status.SUCCEEDED, seconds=1, hours_ago=3)
    for index, run in enumerate(on[1][10:]):  # one hour: 10 runs of 1..10 s
        finish([run], Run.Status.SUCCEEDED, seconds=index + 1, hours_ago=0.01)
    finish(on[2][:5], Run.Status.FAILED, seconds=30, hours_ago=0.01)
    finish(on[2][5:], Run.Status.SUCCEEDED, seconds=2, hours_ago=0.01)

    trend = selectors.release_panel(Workflow.objects.get(slug="orders")).trend

    assert [line.version for line in trend.versions] == [2, 1]
    v2_now, v1_now = trend.versions[0].buckets[-1], trend.versions[1].buckets[-1]
    assert (v2_now.runs, v2_now.failures, v2_now.failure_rate) == (20, 5, 0.25)
    assert v2_now.p95_seconds == pytest.approx(analysis.p95([30.0] * 5 + [2.0] * 15))
    assert (v1_now.runs, v1_now.failures) == (10, 0)
    assert v1_now.p95_seconds == pytest.approx(analysis.p95([float(s) for s in range(1, 11)]))
    earlier = [b for b in trend.versions[1].buckets[:-1] if b is not None]
    assert [(b.runs, b.p95_seconds) for b in earlier] == [(10, pytest.approx(1.0))]
    assert sum(b is None for b in trend.versions[0].buckets) == 23


def test_the_page_draws_the_trend_as_an_svg_per_measure(operator_client):
    deployment = canary(steps=(50, 100))
    finish(start(10), Run.Status.SUCCEEDED, seconds=3)
    html = page(operator_client)
    assert html.count('class="release-chart"') == 2
    assert "Failure rate per hour of each version" in html and "<polyline" in html
    assert f"v{deployment.version.number} " in html.split('class="legend"')[1]
    assert "p95 3.00s over 5 runs" in html


def test_the_workflow_page_reads_the_same_number_of_queries_for_10_or_100_runs(operator_client):
    canary(steps=(50, 100), min_runs=500)

    def count(n: int) -> tuple[int, int]:
        runs = start(n)
        finish(runs[: n // 2], Run.Status.SUCCEEDED, hours_ago=2)
        finish(runs[n // 2 :], Run.Status.FAILED, hours_ago=0.1)
        judging.advance_in_flight()  # evidence: waiting
        with CaptureQueriesContext(connection) as captured:
            response = operator_client.get(PAGE)
        assert response.status_code == 200
        poll = status_url(response.content.decode())
        with CaptureQueriesContext(connection) as polled:
            assert operator_client.get(poll).status_code == 200
        return len(captured), len(polled)

    few = count(10)
    many = count(100)
    assert few == many, f"(page, poll) queries: {few} with 10 runs, {many} with 110"
    assert few[1] < few[0], "the poll reads only the state"


# --- Actions -----------------------------------------------------------------------------------


def test_deploy_starts_a_canary_once_however_often_the_form_is_sent(operator_client):
    load(1)
    load(2, deploying=None)
    form = {
        "deploy-version": "2",
        "deploy-strategy": "canary",
        "deploy-steps": "25, 100",
        "deploy-min_runs": "5",
        "deploy-reason": "ship v2",
    }
    first = followed(operator_client.post("/workflows/orders/deploy/", form, follow=True))
    second = followed(operator_client.post("/workflows/orders/deploy/", form, follow=True))

    deployment = Deployment.objects.get(state=Deployment.State.RAMPING)
    assert (deployment.version.number, deployment.steps, deployment.min_runs) == (2, [25, 100], 5)
    assert (deployment.actor, deployment.reason) == ("olga", "ship v2")
    assert "orders v2 is a canary on 25% of new runs." in first
    assert "v2 of orders is being deployed (canary, ramping): promote or abort it first" in second
    assert AuditEvent.objects.filter(action="deploy", actor="olga").count() == 1


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"deploy-reason": ""}, "Reason: Say why: the reason is kept in the audit."),
        ({"deploy-steps": "50,10"}, "Canary steps must be rising percentages"),
        ({"deploy-steps": "ten"}, "Give whole percentages separated by commas"),
        ({"deploy-version": "9"}, "orders has no version 9: nothing deployed."),
    ],
)
def test_a_deploy_that_cannot_be_done_says_why_on_the_page(operator_client, change, said):
    load(1)
    load(2, deploying=None)
    form = {"deploy-version": "2", "deploy-strategy": "canary", "deploy-reason": "r", **change}
    html = followed(operator_client.post("/workflows/orders/deploy/", form, follow=True))
    assert said in html
    assert 'class="msg-error"' in html
    assert not Deployment.objects.filter(version__number=2).exists()


def test_promote_moves_one_step_even_when_the_form_is_sent_twice(operator_client):
    deployment = canary(steps=(10, 50, 100))
    url = f"/deployments/{deployment.pk}/promote/"
    form = {"promote-step": "0", "promote-reason": "looks good"}
    first = followed(operator_client.post(url, form, follow=True))
    second = followed(operator_client.post(url, form, follow=True))

    deployment.refresh_from_db()
    assert (deployment.state, deployment.percent) == (Deployment.State.RAMPING, 50)
    assert "orders v2 is a canary on 50% of new runs." in first
    assert "Not promoted again: it moved on since the page was shown." in second
    assert AuditEvent.objects.filter(action="promote_deployment").count() == 1


def test_abort_from_the_page_puts_new_runs_back_once(operator_client):
    deployment = canary()
    url = f"/deployments/{deployment.pk}/abort/"
    form = {"abort-reason": "wrong build"}
    operator_client.post(url, form)
    second = followed(operator_client.post(url, form, follow=True))

    deployment.refresh_from_db()
    assert (deployment.state, deployment.outcome) == (Deployment.State.ABORTED, "wrong build")
    assert "Nothing to abort" in second
    assert "Why: wrong build" in second
    assert AuditEvent.objects.filter(action="abort_deployment").count() == 1
    assert {run.version.number for run in start(5)} == {1}


def test_every_action_is_refused_without_the_permission_and_the_refusal_audited(viewer_client):
    deployment = canary()
    attempts = [
        ("/workflows/orders/deploy/", {"deploy-version": "1", "deploy-reason": "r"}, "deploy"),
        (f"/deployments/{deployment.pk}/promote/", {"promote-step": "0"}, "promote_deployment"),
        (f"/deployments/{deployment.pk}/abort/", {"abort-reason": "r"}, "abort_deployment"),
        (
            "/workflows/orders/rollback-version/apply/",
            {"rollback-to": "1", "rollback-reason": "r"},
            "rollback_version",
        ),
        ("/definitions/upload/", {"source": source(3), "load": "1"}, "deploy"),
        (
            "/workflows/orders/versions/1/runs-left/",
            {"move-runs": "cancel", "move-reason": "r"},
            "move_runs_off",
        ),
    ]
    for url, form, action in attempts:
        response = viewer_client.post(url, form)
        assert response.status_code == 403, url
        assert "ask an administrator for the &#x27;workflows.operate_run&#x27; permission" in (
            response.content.decode()
        )
        assert AuditEvent.objects.filter(actor="victor", action=action).exists(), url
    deployment.refresh_from_db()
    assert (deployment.state, deployment.step) == (Deployment.State.RAMPING, 0)
    assert Workflow.objects.get(slug="orders").versions.count() == 2


def test_actions_need_a_login_and_a_post(client, operator_client):
    deployment = canary()
    for url in ["/workflows/orders/rollback-version/?to=1", "/definitions/upload/"]:
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"], url
    response = client.post(f"/deployments/{deployment.pk}/abort/", {"abort-reason": "r"})
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert operator_client.get(f"/deployments/{deployment.pk}/abort/").status_code == 405
    assert operator_client.post("/deployments/999999/abort/", {}).status_code == 404


def test_the_rollback_preview_lists_the_runs_left_and_restarts_them_once(operator_client):
    load(1)
    load(2)
    queued = start(2)
    failed = start(1)
    finish(failed, Run.Status.FAILED)

    html = page(operator_client, "/workflows/orders/rollback-version/?to=1")

    assert "Every new run of <strong>orders</strong> gets <strong>v1</strong>, at once." in html
    assert "Now: All new runs on v2." in html
    for run in queued + failed:
        assert f'<a href="/runs/{run.pk}/">#{run.pk}</a>' in html
    assert "<strong>2 queued</strong>" in html and "<strong>1 failed</strong>" in html
    assert 'value="restart"' in html

    form = {"rollback-to": "1", "rollback-runs": "restart", "rollback-reason": "v2 is broken"}
    url = "/workflows/orders/rollback-version/apply/"
    done = followed(operator_client.post(url, form, follow=True))
    again = followed(operator_client.post(url, form, follow=True))

    assert "orders now starts new runs on v1." in done
    assert "orders v1 is already live." in again
    assert Deployment.objects.get(state=Deployment.State.ACTIVE).version.number == 1
    assert AuditEvent.objects.filter(action="rollback_version").count() == 1
    for run in queued + failed:
        (restart,) = Run.objects.filter(restarted_from=run)
        assert restart.version.number == 1


def test_the_runs_left_on_a_version_are_listed_and_restarted_from_their_page(operator_client):
    load(1)
    load(2)
    left = start(2)
    services.rollback_version(Workflow.objects.get(slug="orders"), 1, actor="t", reason="bad")
    url = "/workflows/orders/versions/2/runs-left/"

    html = page(operator_client, url)

    assert "<strong>2</strong> unfinished runs of <strong>orders v2</strong>" in html
    assert "restarted, they run <strong>v1</strong>" in html
    for run in left:
        assert f'<a href="/runs/{run.pk}/">#{run.pk}</a>' in html
    assert re.search(r'<input type="radio" name="move-runs" value="restart"[^>]* checked>', html)
    form = {"move-runs": "restart", "move-reason": "v2 is broken"}
    done = followed(operator_client.post(url, form, follow=True))
    assert "2 run(s) of orders v2 restarted on v1." in done
    assert Run.objects.filter(restarted_from__in=left, version__number=1).count() == 2
    assert "No run of orders v2 is unfinished. Nothing to do." in page(operator_client, url)
    again = followed(operator_client.post(url, form, follow=True))
    assert "No unfinished runs of orders v2." in again
    assert Run.objects.filter(restarted_from__in=left).count() == 2


def test_the_runs_left_page_says_what_cannot_be_done(operator_client):
    load(1)
    load(2)
    live_page = page(operator_client, "/workflows/orders/versions/2/runs-left/")
    assert "orders v2 is live: new runs get it. Roll back to another version first." in live_page
    assert '<form method="post"' not in live_page
    missing = operator_client.get("/workflows/orders/versions/9/runs-left/")
    assert missing.status_code == 404
    assert "orders has no version 9 (it has v1, v2)." in missing.content.decode()
    posted = operator_client.post(
        "/workflows/orders/versions/2/runs-left/", {"move-runs": "restart", "move-reason": "x"}
    )
    assert posted.status_code == 400
    assert "orders v2 is live" in posted.content.decode()
    start(1)
    load(3)  # v2 left, with a run on it
    empty = operator_client.post("/workflows/orders/versions/2/runs-left/", {"move-runs": "x"})
    said = empty.content.decode()
    assert empty.status_code == 400 and "Say why: the reason is kept in the audit." in said
    assert "Select a valid choice. x is not one of the available choices." in said
    assert not Run.objects.filter(status=Run.Status.CANCELLED).exists()


def test_rollback_problems_are_said_on_its_page(operator_client, viewer_client):
    load(1)
    load(2)
    missing = page(operator_client, "/workflows/orders/rollback-version/?to=9")
    assert "orders has no version 9 (it has v1, v2)." in missing
    noop = page(operator_client, "/workflows/orders/rollback-version/?to=2")
    assert "v2 is already live. Nothing would change." in noop and "Confirm" not in noop
    url = "/workflows/orders/rollback-version/apply/"
    unexplained = operator_client.post(url, {"rollback-to": "1", "rollback-runs": "finish"})
    assert unexplained.status_code == 400
    assert "Say why: the reason is kept in the audit." in unexplained.content.decode()
    viewer = page(viewer_client, "/workflows/orders/rollback-version/?to=1")
    assert "gets <strong>v1</strong>" in viewer
    assert "Rolling back needs the <code>workflows.operate_run</code> permission." in viewer
    assert Deployment.objects.get(state=Deployment.State.ACTIVE).version.number == 2


# --- Uploading a definition ----------------------------------------------------------------


def check(client, text: str, **extra):
    return client.post("/definitions/upload/", {"source": text, "check": "1", **extra})


def test_the_upload_page_is_linked_and_starts_from_the_live_source(operator_client):
    load(1)
    assert 'href="/definitions/upload/"' in page(operator_client, "/workflows/")
    assert 'href="/definitions/upload/?workflow=orders"' in page(operator_client)
    html = page(operator_client, "/definitions/upload/?workflow=orders")
    assert "value: 1" in html and 'type="file"' in html and 'enctype="multipart/form-data"' in html


def test_check_lists_each_problem_with_its_path(operator_client):
    text = "name: Orders\nslug: orders\nnodes:\n  load: {type: no.such.type}\n"
    response = check(operator_client, text)
    html = response.content.decode()
    assert response.status_code == 400
    assert "Not a valid workflow definition: 1 problem." in html
    assert "<code>nodes.load.type</code>: no node type named &#x27;no.such.type&#x27;" in html
    assert "Load and deploy" not in html
    broken = check(operator_client, "nodes: [\n").content.decode()
    assert "<code>(file)</code>: not valid YAML or JSON" in broken


def test_check_shows_a_unified_diff_against_the_live_version(operator_client):
    load(1)
    load(2, deploying=None)  # the latest, not the live one
    html = check(operator_client, source(3)).content.decode()
    assert "Against v1 <small>the live version</small>" in html
    assert '<span class="file">--- v1 (live)</span><span class="file">+++ uploaded</span>' in html
    assert '<span class="removed">-      value: 1</span>' in html
    assert '<span class="added">+      value: 3</span>' in html
    assert "Load and deploy orders" in html
    same = check(operator_client, source(2)).content.decode()
    assert "Same content as v2, the latest version" in same


def test_check_of_a_new_workflow_from_a_file_says_it_is_new(operator_client):
    upload = SimpleUploadedFile("orders.yaml", source(1).encode(), content_type="text/yaml")
    response = operator_client.post("/definitions/upload/", {"file": upload, "check": "1"})
    html = response.content.decode()
    assert response.status_code == 200
    assert "A new workflow: <strong>orders</strong> does not exist yet" in html
    assert "value: 1" in html, "the file's text is put in the textarea for the load"
    assert not Workflow.objects.exists()


def test_load_stores_the_checked_definition_and_deploys_it_by_the_chosen_strategy(
    operator_client,
):
    load(1)
    text = source(2)
    form = {
        "source": text,
        "checked": hashlib.sha256(text.encode()).hexdigest(),
        "deploy": "canary",
        "reason": "v2 fixes the totals",
        "load": "1",
    }
    response = operator_client.post("/definitions/upload/", form)
    assert response.status_code == 302 and response["Location"] == "/workflows/orders/#release"
    again = followed(operator_client.post("/definitions/upload/", form, follow=True))

    version = Workflow.objects.get(slug="orders").versions.get(number=2)
    assert (version.created_by, version.note, version.source) == (
        "olga",
        "v2 fixes the totals",
        text,
    )
    deployment = Deployment.objects.get(version=version)
    assert (deployment.state, deployment.actor) == (Deployment.State.RAMPING, "olga")
    assert "orders v2 unchanged." in again
    assert Workflow.objects.get(slug="orders").versions.count() == 2


def test_load_refuses_what_was_not_checked_and_says_why_it_cannot_deploy(operator_client):
    load(1)
    load(2, deploying=None)
    services.deploy(
        Workflow.objects.get(slug="orders").versions.get(number=2),
        actor="test",
        reason="r",
        strategy="canary",
    )
    text = source(3)
    form = {"source": text, "deploy": "immediate", "reason": "v3", "load": "1"}
    unchecked = operator_client.post("/definitions/upload/", {**form, "checked": "stale"})
    assert unchecked.status_code == 400
    assert "The definition changed since it was checked" in unchecked.content.decode()

    digest = hashlib.sha256(text.encode()).hexdigest()
    busy = operator_client.post("/definitions/upload/", {**form, "checked": digest})
    assert busy.status_code == 400
    assert (
        "Nothing loaded: v2 of orders is being deployed (canary, ramping): promote or abort it "
        "first" in busy.content.decode()
    )
    unexplained = operator_client.post(
        "/definitions/upload/", {**form, "checked": digest, "reason": " "}
    )
    assert "Say why you load it" in unexplained.content.decode()
    assert Workflow.objects.get(slug="orders").versions.count() == 2
