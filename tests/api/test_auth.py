"""Who may call the API: bearer tokens, browser sessions with CSRF, permissions, methods."""

import hashlib
import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from tests.api.conftest import Api, make_user
from workflows.api import auth
from workflows.models import ApiToken, AuditEvent, RunEvent

pytestmark = pytest.mark.django_db

CSRF_SECRET = "a" * 32


def error(response) -> dict:
    assert response["Content-Type"] == "application/json", response.content
    return response.json()["error"]


# --- No or bad credentials --------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("get", "runs"), ("post", "runs/1/resume")])
def test_no_credentials_is_401_with_a_json_message_saying_how_to_authenticate(client, method, path):
    response = getattr(Api(client), method)(path)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="keel"'
    assert error(response)["code"] == "not_authenticated"
    assert "create_api_token" in error(response)["message"]


@pytest.mark.parametrize(
    "header",
    ["Token abc", "Bearer", "Bearer    ", "Basic dXNlcjpwdw==", "Bearer keel_not-a-real-token"],
)
def test_a_malformed_or_unknown_token_is_401(client, header):
    response = client.get("/api/v1/runs", headers={"Authorization": header})
    assert response.status_code == 401
    assert error(response)["code"] == "not_authenticated"


def test_a_revoked_token_is_401(client, operator, token_for):
    raw = token_for(operator)
    assert Api(client, raw).get("runs").status_code == 200
    assert auth.revoke_token(ApiToken.objects.get(user=operator))
    response = Api(client, raw).get("runs")
    assert response.status_code == 401
    assert "revoked" in error(response)["message"]


def test_a_token_of_an_inactive_user_is_401(client, operator, token_for):
    raw = token_for(operator)
    operator.is_active = False
    operator.save()
    assert Api(client, raw).get("runs").status_code == 401


def test_a_wrong_token_is_401_even_with_a_valid_session(client, operator):
    client.force_login(operator)
    assert client.get("/api/v1/runs").status_code == 200
    response = client.get("/api/v1/runs", headers={"Authorization": "Bearer keel_wrong"})
    assert response.status_code == 401


# --- Tokens -----------------------------------------------------------------------------------


def test_only_a_hash_of_the_token_is_stored_with_a_short_visible_prefix(operator):
    token, raw = auth.create_token(operator, "cron")
    assert raw.startswith("keel_") and len(raw) > 40
    stored = ApiToken.objects.get(pk=token.pk)
    assert stored.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert stored.prefix == raw[:12]
    assert raw not in {value for value in vars(stored).values() if isinstance(value, str)}


def test_a_token_request_records_last_use_at_most_once_a_minute(client, operator, token_for):
    raw = token_for(operator)
    token = ApiToken.objects.get(user=operator)
    assert token.last_used_at is None
    Api(client, raw).get("runs")
    token.refresh_from_db()
    first = token.last_used_at
    assert first is not None
    Api(client, raw).get("runs")
    token.refresh_from_db()
    assert token.last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    Api(client, raw).get("runs")
    token.refresh_from_db()
    assert token.last_used_at > first


def test_create_api_token_prints_the_token_once_and_stores_its_hash(operator):
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", "olga", "--name", "nightly cron", stdout=out, stderr=err)
    raw = out.getvalue().strip()
    token = ApiToken.objects.get(user=operator)
    assert token.name == "nightly cron"
    assert token.token_hash == auth.hash_token(raw)
    assert "cannot be shown again" in err.getvalue() and raw not in err.getvalue()
    assert Api(Client(), raw).get("runs").status_code == 200


def test_create_api_token_says_what_to_do_for_an_unknown_user(db):
    with pytest.raises(CommandError, match=r"No user 'ghost'\. Create one"):
        call_command("create_api_token", "ghost", "--name", "x")


# --- Sessions and CSRF ------------------------------------------------------------------------


@pytest.fixture
def browser(operator):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    return client


def test_a_session_can_read_and_is_given_a_csrf_cookie(browser):
    response = browser.get("/api/v1/runs")
    assert response.status_code == 200
    assert "csrftoken" in response.cookies


def test_a_session_post_without_a_csrf_token_is_403(browser, failed_chain):
    response = browser.post(
        f"/api/v1/runs/{failed_chain.pk}/resume",
        {"reason": "x"},
        content_type="application/json",
    )
    assert response.status_code == 403
    assert error(response)["code"] == "csrf_failed"
    assert "X-CSRFToken" in error(response)["message"]
    failed_chain.refresh_from_db()
    assert failed_chain.status == "failed"


def test_a_session_post_with_the_csrf_token_acts(browser, failed_chain):
    browser.cookies["csrftoken"] = CSRF_SECRET
    response = browser.post(
        f"/api/v1/runs/{failed_chain.pk}/resume",
        {"reason": "from the browser"},
        content_type="application/json",
        headers={"X-CSRFToken": CSRF_SECRET},
    )
    assert response.status_code == 200, response.content
    assert response.json()["changed"] is True
    event = RunEvent.objects.filter(run=failed_chain, kind="operator").get()
    assert (event.actor, event.reason) == ("olga", "from the browser")


def test_a_token_post_needs_no_csrf_token(operator, token_for, failed_chain):
    client = Client(enforce_csrf_checks=True)
    response = Api(client, token_for(operator)).post(
        f"runs/{failed_chain.pk}/resume", {"reason": "script"}
    )
    assert response.status_code == 200
    assert response.json()["changed"] is True


# --- Permissions ------------------------------------------------------------------------------


def test_reading_without_the_view_permission_is_403(client, nobody, token_for):
    response = Api(client, token_for(nobody)).get("runs")
    assert response.status_code == 403
    assert "workflows.view_run" in error(response)["message"]


def test_acting_without_the_operate_permission_is_403_and_the_denial_is_audited(
    viewer_api, failed_chain
):
    response = viewer_api.post(f"runs/{failed_chain.pk}/resume", {"reason": "let me"})
    assert response.status_code == 403
    assert "operate_run" in error(response)["message"]
    denial = RunEvent.objects.get(run=failed_chain, kind="operator")
    assert denial.actor == "vic" and denial.before == {"action": "resume", "denied": True}
    failed_chain.refresh_from_db()
    assert failed_chain.status == "failed"


def test_a_viewer_may_preview_but_not_start_a_run(viewer_api, failed_chain):
    preview = viewer_api.post(f"runs/{failed_chain.pk}/resume?dry_run=1")
    assert preview.status_code == 200
    refused = viewer_api.post("workflows/chain/runs", {"wait": 0})
    assert refused.status_code == 403 and "workflows.operate_run" in refused.content.decode()
    [refusal] = AuditEvent.objects.filter(action="start_run")  # audited
    assert (refusal.actor, refusal.target) == ("vic", "workflow:chain")


@pytest.mark.parametrize("query", ["", "?dry_run=1"])
def test_acting_or_previewing_without_any_run_permission_is_403(
    client, nobody, token_for, failed_chain, query
):
    api = Api(client, token_for(nobody))
    response = api.post(f"runs/{failed_chain.pk}/nodes/zzz/retry{query}", {"reason": "x"})
    assert response.status_code == 403  # not 404: it may not learn which nodes exist
    assert "'workflows.view_run' or 'workflows.operate_run'" in error(response)["message"]


def test_an_operator_without_the_view_permission_may_still_act(
    client, django_user_model, token_for, failed_chain
):
    user = make_user(django_user_model, "ops-only", "operate_run")
    response = Api(client, token_for(user)).post(f"runs/{failed_chain.pk}/resume", {"reason": "x"})
    assert response.status_code == 200 and response.json()["changed"] is True


# --- Methods and unknown URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("get", "runs/1/resume", "OPTIONS, POST"),
        ("delete", "runs/1", "GET, HEAD, OPTIONS"),
        ("put", "workflows/chain/runs", "GET, HEAD, OPTIONS, POST"),
        ("post", "runs", "GET, HEAD, OPTIONS"),
    ],
)
def test_a_method_the_url_does_not_take_is_405_with_allow(client, method, path, allow):
    response = getattr(client, method)(f"/api/v1/{path}")
    assert response.status_code == 405
    assert response["Allow"] == allow
    assert error(response)["code"] == "method_not_allowed"


def test_options_lists_the_methods(client):
    response = client.options("/api/v1/runs/1/nodes/a/retry")
    assert response.status_code == 204 and response["Allow"] == "OPTIONS, POST"


@pytest.mark.parametrize(
    "path", ["/api/v1/", "/api/v1/nope", "/api/v1/runs/abc", "/api/v1/x/", "/api/v1/a%0Ab/c"]
)
def test_an_unknown_api_url_is_a_json_404_pointing_at_the_document(client, path):
    response = client.post(path)
    assert response.status_code == 404
    assert "/api/v1/openapi.json" in error(response)["message"]
    assert "trailing slash" not in error(response)["message"]


def test_a_trailing_slash_gets_a_hint(client):
    response = client.get("/api/v1/runs/")
    assert response.status_code == 404
    assert (
        "did you mean /api/v1/runs? API paths have no trailing slash" in error(response)["message"]
    )


def test_the_openapi_document_is_public(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.")


def test_a_token_past_its_expiry_is_401_saying_so(client, operator):
    token, raw = auth.create_token(operator, "cron", expires_at=timezone.now() + timedelta(hours=1))
    assert Api(client, raw).get("runs").status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    response = Api(client, raw).get("runs")

    assert response.status_code == 401
    assert "This API token ('cron') expired at " in error(response)["message"]
    assert "--expires-in DAYS" in error(response)["message"]


def test_create_api_token_can_set_an_expiry(operator):
    err = io.StringIO()
    call_command(
        "create_api_token",
        "olga",
        "--name",
        "ci",
        "--expires-in",
        "30",
        stdout=io.StringIO(),
        stderr=err,
    )

    token = ApiToken.objects.get(name="ci")
    assert abs(token.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    assert " until " in err.getvalue()
    with pytest.raises(CommandError, match="--expires-in must be a number of days from 1 to 3650"):
        call_command("create_api_token", "olga", "--name", "x", "--expires-in", "0")
