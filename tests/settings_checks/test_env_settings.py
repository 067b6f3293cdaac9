"""Settings from the environment: a bad or missing production value fails at start-up,
naming the variable (config/env.py, config/settings.py).

The settings module is checked in fresh interpreters with a crafted environment, since it
runs once per process; config/env.py's readers are also tested directly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent

SHOW_SETTINGS = """
import django
django.setup()
from django.conf import settings
db = settings.DATABASES["default"]
print("DEBUG", settings.DEBUG)
print("ENGINE", db["ENGINE"])
print("DB_NAME", db["NAME"])
print("REDIS_URL", settings.REDIS_URL)
print("HEARTBEAT", settings.KEEL_HEARTBEAT_SECONDS)
print("ALLOWED_HOSTS", ",".join(settings.ALLOWED_HOSTS))
"""

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "a-long-random-production-secret-0123456789",
    "DATABASE_URL": "postgres://keel:pw@db.internal:5432/keel",
    "REDIS_URL": "redis://cache.internal:6379/0",
}


def start_django(tmp_path, code: str = SHOW_SETTINGS, **env) -> subprocess.CompletedProcess:
    """Run ``django.setup()`` with config.settings and only the given environment.

    Nothing is inherited from the test process (which sets DEBUG=1, REDIS_URL, ...);
    KEEL_VAR_DIR points at a temporary folder so a SQLite default writes nowhere real.
    """
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(BASE_DIR),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "KEEL_VAR_DIR": str(tmp_path / "var"),
    }
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def loaded(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def refused(result: subprocess.CompletedProcess) -> str:
    """The ImproperlyConfigured message of a start-up that failed."""
    assert result.returncode != 0, result.stdout
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: "), result.stderr
    return last_line.removeprefix("django.core.exceptions.ImproperlyConfigured: ")


# --- start-up in a fresh process ---------------------------------------------------------------


def test_production_environment_loads(tmp_path):
    values = loaded(start_django(tmp_path, **PRODUCTION))

    assert values["DEBUG"] == "False"
    assert values["ENGINE"] == "django.db.backends.postgresql"
    assert values["DB_NAME"] == "keel"
    assert values["REDIS_URL"] == "redis://cache.internal:6379/0"


def test_laptop_defaults_load_with_debug_on(tmp_path):
    values = loaded(start_django(tmp_path, DEBUG="1"))

    assert values["ENGINE"] == "django.db.backends.sqlite3"
    assert values["DB_NAME"] == str(tmp_path / "var" / "keel.sqlite3")
    assert values["REDIS_URL"].startswith("unix://")
    assert values["HEARTBEAT"] == "5"
    assert "localhost" in values["ALLOWED_HOSTS"].split(",")


def test_sqlite_database_url_is_accepted(tmp_path):
    values = loaded(
        start_django(tmp_path, **{**PRODUCTION, "DATABASE_URL": f"sqlite:///{tmp_path}/k.db"})
    )

    assert values["ENGINE"] == "django.db.backends.sqlite3"


@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
def test_debug_off_without_secret_key_names_secret_key(tmp_path, secret):
    env = {key: value for key, value in PRODUCTION.items() if key != "SECRET_KEY"}
    if secret is not None:
        env["SECRET_KEY"] = secret

    message = refused(start_django(tmp_path, **env))

    assert message.startswith("SECRET_KEY is required when DEBUG is off.")


def test_debug_defaults_to_off(tmp_path):
    assert loaded(start_django(tmp_path))["DEBUG"] == "False"


def test_the_laptop_setup_makes_a_secret_key_of_its_own_and_keeps_it(tmp_path):
    show_key = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"

    def key() -> str:
        run = start_django(tmp_path, show_key)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    first, again = key(), key()
    kept = tmp_path / "var" / "secret-key"
    assert first == again == kept.read_text().strip(), "every shell signs alike"
    assert len(first) >= 50
    assert kept.stat().st_mode & 0o777 == 0o600
    assert not [path for path in kept.parent.iterdir() if ".secret-key" in path.name]


def test_outside_the_laptop_setup_debug_off_needs_a_secret_key(tmp_path):
    message = refused(start_django(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/k.db"))

    assert message.startswith("SECRET_KEY is required when DEBUG is off.")
    assert not (tmp_path / "var" / "secret-key").exists()


def test_a_spoilt_secret_key_file_names_the_file(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "secret-key").write_text("\n")

    message = refused(start_django(tmp_path))

    assert "secret-key holds no usable secret key; delete it" in message


def test_debug_that_is_not_a_boolean_names_debug(tmp_path):
    message = refused(start_django(tmp_path, **{**PRODUCTION, "DEBUG": "maybe"}))

    assert message.startswith("DEBUG='maybe' is not a boolean")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "KEEL_HEARTBEAT_SECONDS='abc' is not a whole number."),
        ("2.5", "KEEL_HEARTBEAT_SECONDS='2.5' is not a whole number."),
        ("0", "KEEL_HEARTBEAT_SECONDS=0 is below the minimum of 1."),
        ("301", "KEEL_HEARTBEAT_SECONDS=301 is above the maximum of 300."),
    ],
)
def test_bad_heartbeat_seconds_names_the_variable(tmp_path, value, expected):
    message = refused(start_django(tmp_path, **{**PRODUCTION, "KEEL_HEARTBEAT_SECONDS": value}))

    assert message == expected


def test_good_heartbeat_seconds_is_used(tmp_path):
    values = loaded(start_django(tmp_path, **{**PRODUCTION, "KEEL_HEARTBEAT_SECONDS": "12"}))

    assert values["HEARTBEAT"] == "12"


@pytest.mark.parametrize(
    "url",
    ["mysql://keel:pw@db.internal/keel", "oracle://keel:pw@db.internal/keel"],
    ids=["mysql", "oracle"],
)
def test_unsupported_database_names_database_url(tmp_path, url):
    message = refused(start_django(tmp_path, **{**PRODUCTION, "DATABASE_URL": url}))

    assert message.startswith("DATABASE_URL names django.db.backends.")
    assert "PostgreSQL" in message


@pytest.mark.parametrize(
    "url",
    ["nosuchdb://keel:pw@db.internal/keel", "not a url"],
    ids=["unknown-scheme", "garbage"],
)
def test_unreadable_database_url_names_database_url(tmp_path, url):
    message = refused(start_django(tmp_path, **{**PRODUCTION, "DATABASE_URL": url}))

    assert message.startswith("DATABASE_URL is not a database URL Keel understands")


def test_database_url_error_does_not_print_the_password(tmp_path):
    url = "mysql://keel:hunter2-db-secret@db.internal/keel"

    result = start_django(tmp_path, **{**PRODUCTION, "DATABASE_URL": url})

    assert "DATABASE_URL" in refused(result)
    assert "hunter2-db-secret" not in result.stderr + result.stdout


@pytest.mark.parametrize("url", ["http://x", "localhost:6379", "redis:/oops"])
def test_redis_url_with_wrong_scheme_names_redis_url(tmp_path, url):
    message = refused(start_django(tmp_path, **{**PRODUCTION, "REDIS_URL": url}))

    assert message.startswith("REDIS_URL must start with redis://, rediss:// or unix://")


@pytest.mark.parametrize("url", ["rediss://cache.internal:6380/0", "unix:///run/redis.sock?db=2"])
def test_other_redis_schemes_are_accepted(tmp_path, url):
    values = loaded(start_django(tmp_path, **{**PRODUCTION, "REDIS_URL": url}))

    assert values["REDIS_URL"] == url


def test_redis_url_error_does_not_print_the_password(tmp_path):
    url = "http://:hunter2-redis-secret@cache.internal:6379/0"

    result = start_django(tmp_path, **{**PRODUCTION, "REDIS_URL": url})

    assert "REDIS_URL" in refused(result)
    assert "hunter2-redis-secret" not in result.stderr + result.stdout


def test_default_timeout_above_max_timeout_names_both(tmp_path):
    env = {**PRODUCTION, "KEEL_DEFAULT_TIMEOUT": "600", "KEEL_MAX_TIMEOUT": "300"}

    message = refused(start_django(tmp_path, **env))

    assert message == "KEEL_DEFAULT_TIMEOUT=600 is above KEEL_MAX_TIMEOUT=300."


def test_allowed_hosts_are_split_on_commas_and_trimmed(tmp_path):
    values = loaded(
        start_django(tmp_path, **{**PRODUCTION, "ALLOWED_HOSTS": " keel.example.com, ,10.0.0.5 "})
    )

    assert values["ALLOWED_HOSTS"] == "keel.example.com,10.0.0.5"


# --- config/env.py readers ---------------------------------------------------------------------

VARIABLE = "KEEL_TEST_SETTING"


@pytest.fixture
def unset(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_env_bool_reads_true(monkeypatch, raw):
    monkeypatch.setenv(VARIABLE, raw)

    assert env_bool(VARIABLE, False) is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", ""])
def test_env_bool_reads_false(monkeypatch, raw):
    monkeypatch.setenv(VARIABLE, raw)

    assert env_bool(VARIABLE, True) is False


@pytest.mark.parametrize("default", [True, False])
def test_env_bool_unset_gives_the_default(unset, default):
    assert env_bool(VARIABLE, default) is default


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "enabled"])
def test_env_bool_rejects_other_words_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(VARIABLE, raw)

    with pytest.raises(ImproperlyConfigured, match=rf"^{VARIABLE}='{raw}' is not a boolean"):
        env_bool(VARIABLE, False)


@pytest.mark.parametrize(("raw", "value"), [("42", 42), (" 7 ", 7), ("-3", -3), ("0", 0)])
def test_env_int_reads_whole_numbers(monkeypatch, raw, value):
    monkeypatch.setenv(VARIABLE, raw)

    assert env_int(VARIABLE, 5) == value


@pytest.mark.parametrize("raw", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_env_int_unset_or_blank_gives_the_default(monkeypatch, raw):
    monkeypatch.delenv(VARIABLE, raising=False)
    if raw is not None:
        monkeypatch.setenv(VARIABLE, raw)

    assert env_int(VARIABLE, 5, minimum=1) == 5


@pytest.mark.parametrize("raw", ["abc", "2.5", "1e3", "10s"])
def test_env_int_rejects_non_integers_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(VARIABLE, raw)

    with pytest.raises(ImproperlyConfigured) as caught:
        env_int(VARIABLE, 5)

    assert str(caught.value) == f"{VARIABLE}={raw!r} is not a whole number."


def test_env_int_enforces_the_minimum(monkeypatch):
    monkeypatch.setenv(VARIABLE, "0")

    with pytest.raises(ImproperlyConfigured) as caught:
        env_int(VARIABLE, 5, minimum=1)

    assert str(caught.value) == f"{VARIABLE}=0 is below the minimum of 1."


def test_env_int_enforces_the_maximum(monkeypatch):
    monkeypatch.setenv(VARIABLE, "301")

    with pytest.raises(ImproperlyConfigured) as caught:
        env_int(VARIABLE, 5, maximum=300)

    assert str(caught.value) == f"{VARIABLE}=301 is above the maximum of 300."


@pytest.mark.parametrize("raw", ["1", "300"])
def test_env_int_accepts_values_at_the_bounds(monkeypatch, raw):
    monkeypatch.setenv(VARIABLE, raw)

    assert env_int(VARIABLE, 5, minimum=1, maximum=300) == int(raw)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("a,b,c", ["a", "b", "c"]),
        (" a , b ,, c ,", ["a", "b", "c"]),
        ("single", ["single"]),
        ("", []),
        (" , ", []),
    ],
)
def test_env_list_splits_on_commas_and_drops_blanks(monkeypatch, raw, value):
    monkeypatch.setenv(VARIABLE, raw)

    assert env_list(VARIABLE, ["default"]) == value


def test_env_list_unset_gives_the_default(unset):
    assert env_list(VARIABLE, ["x", "y"]) == ["x", "y"]


def test_env_str_reads_the_value_or_the_default(monkeypatch, unset):
    assert env_str(VARIABLE) is None
    assert env_str(VARIABLE, "fallback") == "fallback"

    monkeypatch.setenv(VARIABLE, "value")

    assert env_str(VARIABLE, "fallback") == "value"


SHOW_HTTPS = """
import django
django.setup()
from django.conf import settings
print(repr((settings.SECURE_SSL_REDIRECT, settings.SECURE_HSTS_SECONDS,
            settings.SECURE_HSTS_INCLUDE_SUBDOMAINS, settings.SECURE_PROXY_SSL_HEADER)))
"""


def https_settings(tmp_path, **env) -> subprocess.CompletedProcess:
    return start_django(tmp_path, SHOW_HTTPS, **{**PRODUCTION, **env})


def test_https_settings_come_from_the_environment(tmp_path):
    assert https_settings(tmp_path).stdout.strip() == "(False, 0, False, None)"
    done = https_settings(
        tmp_path,
        SECURE_SSL_REDIRECT="1",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="yes",
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https",
    )
    assert done.stdout.strip() == "(True, 31536000, True, ('HTTP_X_FORWARDED_PROTO', 'https'))"


def test_a_proxy_header_without_a_value_is_refused(tmp_path):
    message = refused(https_settings(tmp_path, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto"))

    assert message.startswith(
        "SECURE_PROXY_SSL_HEADER='X-Forwarded-Proto' is not 'Header-Name: value'"
    )
