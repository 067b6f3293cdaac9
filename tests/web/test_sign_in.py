"""Sign-in throttling: failed sign-ins of one user name from one address lock that pair
out for a while, on Keel's sign-in page and the admin's alike (django-axes)."""

import pytest
from django.test import Client

from tests.web.conftest import PASSWORD, user_with

pytestmark = pytest.mark.django_db


def sign_in(client, username, password, url="/login/"):
    return client.post(url, {"username": username, "password": password})


def test_five_failures_lock_the_name_out_even_with_the_right_password(client, django_user_model):
    user_with(django_user_model, "olga", "view_run")
    for _ in range(4):
        assert sign_in(client, "olga", "wrong").status_code == 200  # the form again
    assert sign_in(client, "olga", "wrong").status_code == 429, "the fifth locks out"

    refused = sign_in(client, "olga", PASSWORD)

    assert refused.status_code == 429
    page = refused.content.decode()
    assert "Too many failed sign-ins" in page and "axes_reset_username" in page
    assert "_auth_user_id" not in client.session
    # Another name from the same address is not locked out.
    user_with(django_user_model, "piet", "view_run")
    assert sign_in(Client(), "piet", PASSWORD).status_code == 302


def test_the_admins_sign_in_counts_too(client, django_user_model):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    for _ in range(5):
        sign_in(client, "root", "wrong", url="/admin/login/")

    assert sign_in(client, "root", PASSWORD, url="/admin/login/").status_code == 429


def test_a_success_clears_the_count(client, django_user_model):
    user_with(django_user_model, "olga", "view_run")
    for _ in range(4):
        sign_in(client, "olga", "wrong")
    assert sign_in(client, "olga", PASSWORD).status_code == 302
    client.logout()
    for _ in range(4):
        sign_in(client, "olga", "wrong")

    assert sign_in(client, "olga", PASSWORD).status_code == 302, "four, not eight, failures"
