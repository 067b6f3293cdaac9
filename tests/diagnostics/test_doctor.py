"""manage.py doctor: one line per check, ✓ or ✗ with the fix, non-zero exit on any ✗.

Each failure is the real condition: no worker on a queue, no watchdog heartbeat, an
evicting or full Redis (a throwaway redis-server), Redis down, an unapplied migration,
insecure production settings.
"""

import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import redis
from django.core.management import CommandError, call_command
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder

from config.embedded_redis import redis_server_binary
from diagnostics import health, system_report
from tests.conftest import BASE_DIR, subprocess_env

ALL_QUEUES = ("high", "default", "low")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def throwaway_redis(tmp_path):
    """Start a redis-server of our own (configured as a test needs); stopped at teardown."""
    processes = []

    def start(*options: str) -> str:
        port = free_port()
        process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("the throwaway redis-server did not start")
                time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def watchdog_ticked(connection, interval: int = 2) -> None:
    """What a watchdog tick writes (the contract doctor reads; see health.py)."""
    connection.set(
        health.WATCHDOG_HEARTBEAT_KEY, datetime.now(UTC).isoformat(), ex=3 * interval + 10
    )


def doctor(capsys) -> tuple[list[str], bool]:
    """Run doctor; return its lines and whether it exited non-zero."""
    failed = False
    try:
        call_command("doctor", no_color=True)
    except CommandError:
        failed = True
    return capsys.readouterr().out.splitlines(), failed


def line(lines: list[str], name: str) -> str:
    (found,) = [text for text in lines if text[2:].startswith(f"{name}:")]
    return found


@pytest.mark.workers
def test_doctor_passes_when_everything_is_in_place(start_worker, clean_redis, settings, capsys):
    # Django's test runner turns DEBUG off: give it a production-grade key.
    settings.SECRET_KEY = "a-long-random-production-key-0123456789abcdef"
    start_worker(queues=ALL_QUEUES)
    watchdog_ticked(clean_redis)
    lines, failed = doctor(capsys)
    checks = [text for text in lines if text[:1] in "✓✗"]
    assert not failed, "\n".join(lines)
    assert all(text.startswith("✓ ") for text in checks)
    names = [text[2:].split(":")[0] for text in checks]
    assert names == [
        "settings",
        "database reachable",
        "database migrated",
        *(["database connections"] if "database connections" in names else []),
        "redis reachable",
        "redis eviction policy",
        "redis memory",
        "worker for queue high",
        "worker for queue default",
        "worker for queue low",
        "watchdog alive",
        "free disk",
        "clock skew",
    ]
    assert "last tick" in line(lines, "watchdog alive")
    assert lines[-1] == f"All {len(checks)} checks passed."


@pytest.mark.workers
def test_doctor_names_the_queue_without_a_worker_and_how_to_start_one(
    start_worker, clean_redis, capsys
):
    worker = start_worker(queues=("high", "default"))
    watchdog_ticked(clean_redis)
    lines, failed = doctor(capsys)
    assert failed
    assert line(lines, "worker for queue high").startswith(
        f"✓ worker for queue high: 1 alive: {worker.name}"
    )
    low = line(lines, "worker for queue low")
    assert low.startswith("✗ ")
    assert "fix: Start one: python manage.py rqworker high default low" in low

    # A worker killed with -9 still has its key in RQ for minutes; doctor is not fooled.
    worker.kill_hard()
    lines, failed = doctor(capsys)
    assert line(lines, "worker for queue high").startswith("✗ ")


@pytest.mark.django_db
def test_doctor_says_when_no_watchdog_is_ticking(clean_redis, capsys):
    lines, failed = doctor(capsys)
    watchdog = line(lines, "watchdog alive")
    assert failed and watchdog.startswith("✗ ")
    assert "fix: Start one: python manage.py watchdog" in watchdog

    watchdog_ticked(clean_redis)
    lines, _ = doctor(capsys)
    assert line(lines, "watchdog alive").startswith("✓ watchdog alive: last tick")

    clean_redis.delete(health.WATCHDOG_HEARTBEAT_KEY)  # what expiry does when ticks stop
    lines, _ = doctor(capsys)
    assert line(lines, "watchdog alive").startswith("✗ ")


@pytest.mark.django_db
def test_doctor_flags_a_redis_that_may_evict_jobs(throwaway_redis, settings, capsys):
    settings.REDIS_URL = throwaway_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    lines, failed = doctor(capsys)
    assert failed
    assert line(lines, "redis reachable").startswith("✓ ")
    eviction = line(lines, "redis eviction policy")
    assert eviction.startswith("✗ redis eviction policy: allkeys-lru")
    assert "CONFIG SET maxmemory-policy noeviction" in eviction


@pytest.mark.django_db
def test_doctor_flags_a_redis_near_its_memory_limit(throwaway_redis, settings, capsys):
    settings.REDIS_URL = throwaway_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    client = redis.Redis.from_url(settings.REDIS_URL)
    value = b"x" * 64 * 1024
    for index in range(200):
        info = client.info("memory")
        if info["used_memory"] >= info["maxmemory"] * 0.93:
            break
        try:
            client.set(f"filler:{index}", value)
        except redis.exceptions.OutOfMemoryError:
            break
    lines, failed = doctor(capsys)
    memory = line(lines, "redis memory")
    assert failed and memory.startswith("✗ redis memory:")
    assert "of 4.0 MiB" in memory and "Raise maxmemory" in memory
    assert line(lines, "redis eviction policy").startswith("✓ ")


@pytest.mark.django_db
def test_doctor_reports_redis_down_and_what_it_cannot_tell(settings, capsys):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    lines, failed = doctor(capsys)
    assert failed
    assert "fix: Check REDIS_URL" in line(lines, "redis reachable")
    for queue in ALL_QUEUES:
        assert line(lines, f"worker for queue {queue}").endswith("fix: Fix Redis first.")
    assert line(lines, "watchdog alive").endswith("fix: Fix Redis first.")
    assert line(lines, "database reachable").startswith("✓ ")


@pytest.mark.django_db
def test_doctor_flags_unapplied_migrations(capsys):
    # The database forgets that the latest diagnostics migration was applied (rolled back
    # with the test's transaction).
    [(_, latest)] = MigrationLoader(None, ignore_no_migrations=True).graph.leaf_nodes("diagnostics")
    MigrationRecorder.Migration.objects.filter(app="diagnostics", name=latest).delete()
    lines, failed = doctor(capsys)
    migrated = line(lines, "database migrated")
    assert failed
    assert migrated.startswith(
        f"✗ database migrated: 1 unapplied migration(s): diagnostics.{latest}"
    )
    assert migrated.endswith("fix: Run: python manage.py migrate")


@pytest.mark.django_db
def test_doctor_flags_settings_unfit_for_production(settings, capsys):
    settings.DEBUG = False
    settings.SECRET_KEY = "keel-insecure-development-key-do-not-use-in-production"
    settings.ALLOWED_HOSTS = []
    settings.KEEL_NODE_MODULES = [*settings.KEEL_NODE_MODULES, "no_such_module.nodes"]
    lines, failed = doctor(capsys)
    assert failed
    assert "python -c 'import secrets" in line(lines, "setting SECRET_KEY")
    assert "is empty" in line(lines, "setting ALLOWED_HOSTS")
    assert "cannot import no_such_module.nodes" in line(lines, "setting KEEL_NODE_MODULES")
    assert not any(text.startswith("✓ settings") for text in lines)


@pytest.mark.django_db
def test_doctor_flags_a_disk_short_of_space_and_measures_clock_skew():
    checks = {
        check.name: check
        for check in system_report.doctor_checks(min_free_bytes=2**62, max_clock_skew=1.0)
    }
    assert checks["free disk"].ok is False
    assert "KEEL_VAR_DIR" in checks["free disk"].fix
    # The database runs on this machine: its clock is ours.
    assert checks["clock skew"].ok is True
    assert abs(health.clock_status()["skew_seconds"]) < 1.0


@pytest.mark.django_db(transaction=True)
def test_doctor_exits_non_zero_from_the_shell(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "doctor", "--no-color"],
        cwd=BASE_DIR,
        env=subprocess_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "✗ redis reachable" in result.stdout
    assert "checks failed" in result.stderr
