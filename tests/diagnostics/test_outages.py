"""Database outages: the watchdog lives through them, remembers when they began, and writes
each down once the database answers again (a restart between two ticks included)."""

import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from django.db import connection
from django.db.utils import load_backend
from django.utils import timezone

from diagnostics import watchdog
from diagnostics.models import Finding
from tests.conftest import BASE_DIR, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_outage_left_behind():
    watchdog._outage.clear()
    watchdog._server.clear()
    yield
    watchdog._outage.clear()
    watchdog._server.clear()


def unreachable_database():
    params = {**connection.settings_dict}
    if connection.vendor == "sqlite":
        params["NAME"] = "/nonexistent/dir/keel.sqlite3"
    else:
        params["PORT"] = "1"
        params["OPTIONS"] = {**params.get("OPTIONS", {}), "connect_timeout": 2}
    return load_backend(params["ENGINE"]).DatabaseWrapper(params, alias="unreachable")


# --- the outage, written down --------------------------------------------------------------


def test_an_outage_is_a_finding_from_its_start_resolved_at_its_end():
    end = timezone.now()
    start = end - timedelta(seconds=12)

    finding = watchdog.record_database_outage(
        start, end, "OperationalError: connection refused", vendor="PostgreSQL"
    )

    finding.refresh_from_db()
    span = f"{timezone.localtime(start):%H:%M:%S}\u2013{timezone.localtime(end):%H:%M:%S}"
    assert finding.title == (
        f"PostgreSQL database unreachable for 12 s ({span}): OperationalError: connection refused"
    )
    assert (finding.code, finding.subject, finding.severity) == (
        "db_unhealthy",
        "database:unreachable",
        "critical",
    )
    assert (finding.first_seen, finding.last_seen, finding.resolved_at) == (start, end, end)
    assert finding.evidence["down_for_seconds"] == 12.0
    assert finding.evidence["error"] == "OperationalError: connection refused"
    assert "It answers again" in finding.suggestion


def test_two_sightings_of_one_outage_make_one_finding():
    end = timezone.now()
    watchdog.record_database_outage(
        end - timedelta(seconds=12), end - timedelta(seconds=2), "OperationalError: a"
    )
    # A second watchdog saw it from later on, until it ended.
    watchdog.record_database_outage(end - timedelta(seconds=8), end, "OperationalError: b")

    finding = Finding.objects.get(code="db_unhealthy")
    assert finding.first_seen == end - timedelta(seconds=12)
    assert finding.resolved_at == end
    assert "unreachable for 12 s" in finding.title


def test_the_watchdog_remembers_when_the_outage_started():
    unreachable = unreachable_database()
    before = timezone.now()
    first = watchdog.tick(db=unreachable)
    between = timezone.now()
    second = watchdog.tick(db=unreachable)

    assert first.database_down and second.database_down
    assert first.database_down.startswith("OperationalError")
    assert "\n" not in first.database_down, "one line"
    watchdog.tick()  # it answers again

    finding = Finding.objects.get(code="db_unhealthy", subject="database:unreachable")
    assert before <= finding.first_seen <= between, "from the first tick that saw it down"
    assert finding.resolved_at is not None
    assert watchdog._outage == {}


def test_the_watchdog_command_lives_through_an_unreachable_database(tmp_path):
    log = tmp_path / "watchdog.log"
    if connection.vendor == "sqlite":
        url = "sqlite:////nonexistent/dir/keel.sqlite3"
    else:
        url = "postgres://nobody@127.0.0.1:1/nothing"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "watchdog", "--interval", "0.2"],
        cwd=BASE_DIR,
        env={**subprocess_env(), "DATABASE_URL": url},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: log.read_text().count("the database does not answer") >= 3,
            message="three ticks that found the database down",
        )
        assert process.poll() is None, "still running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text()
    assert "tick failed" not in text
    assert "Traceback" not in text
    assert text.rstrip().endswith("watchdog stopped")


def test_backoff_while_ticks_fail_stays_short():
    assert watchdog.backoff(2, 0) == 2
    assert watchdog.backoff(2, 1) == 4
    assert watchdog.backoff(2, 5) == watchdog.MAX_BACKOFF_SECONDS
    assert watchdog.backoff(0.5, 1) == 1
    assert watchdog.backoff(30, 3) == 30, "never shorter than the interval"


def test_a_restart_between_two_ticks_is_recorded_from_the_server_s_start_time():
    if connection.vendor != "postgresql":
        pytest.skip("only PostgreSQL says when its server started")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_postmaster_start_time()")
        (started,) = cursor.fetchone()
    # What the last tick saw: an older server, up until 2 s before this one started.
    watchdog._server.update(
        started=started - timedelta(days=1), seen_at=started - timedelta(seconds=2)
    )

    watchdog.tick()

    finding = Finding.objects.get(code="db_unhealthy", subject="database:unreachable")
    assert (finding.first_seen, finding.resolved_at) == (started - timedelta(seconds=2), started)
    assert finding.title.startswith("PostgreSQL database unreachable for 2.0 s (")
    assert "the server restarted at" in finding.title
    watchdog.tick()
    assert Finding.objects.filter(code="db_unhealthy").count() == 1, "recorded once"
