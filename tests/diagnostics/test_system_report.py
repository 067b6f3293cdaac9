"""The system report: real workers and queues read from Redis, secrets masked, Redis down."""

import json
import socket
from urllib.parse import urlsplit

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from diagnostics import rq_state, system_report
from tests.conftest import wait_for
from tests.diagnostics.test_pages import make_finding
from workflows.runtime import dispatch

LOW = {
    "name": "Low priority",
    "nodes": {
        "a": {"type": "keel.noop", "priority": "low"},
        "b": {"type": "keel.noop", "priority": "low"},
    },
}


def unreachable_redis() -> redis.Redis:
    """A client for a port nothing listens on: Redis down, for real."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


def queue(report: dict, name: str) -> dict:
    return next(row for row in report["queues"] if row["name"] == name)


@pytest.mark.workers
def test_report_reads_queues_workers_and_registries_from_redis(start_worker, start_run):
    worker = start_worker(queues=("high",))
    start_run(LOW)  # two root nodes queued on "low", where no worker listens
    # A job that fails on the worker fills the failed registry of "high".
    dispatch.get_queue("high").enqueue("builtins.int", "not a number")
    wait_for(
        lambda: queue(system_report.build_report(), "high")["registries"]["failed"] == 1,
        message="the failing job to reach the failed registry",
    )

    report = system_report.build_report()
    low, high = queue(report, "low"), queue(report, "high")
    assert low["length"] == 2 and low["workers"] == []
    assert low["oldest_enqueued_at"] is not None and low["oldest_age_seconds"] >= 0
    assert high["length"] == 0 and worker.name in high["workers"]
    assert set(high["registries"]) == {
        "started",
        "failed",
        "finished",
        "deferred",
        "scheduled",
        "canceled",
    }
    (row,) = [w for w in report["workers"] if w["name"] == worker.name]
    assert row["pid"] == worker.pid
    assert row["hostname"] == socket.gethostname()
    assert row["queues"] == ["high"]
    assert row["alive"] is True
    assert row["failed_jobs"] == 1
    assert row["last_heartbeat"] is not None
    assert report["versions"]["rq"] == "2.12.0"
    assert report["versions"]["redis_server"] != "unreachable"
    assert report["database"]["reachable"] and report["redis"]["reachable"]
    checks = {check["name"]: check["ok"] for check in report["checks"]}
    assert checks["worker for queue high"] is True
    assert checks["worker for queue low"] is False

    # kill -9: RQ still lists the worker (its key lives for minutes); the report knows better.
    worker.kill_hard()
    report = system_report.build_report()
    (row,) = [w for w in report["workers"] if w["name"] == worker.name]
    assert row["alive"] is False
    assert worker.name not in queue(report, "high")["workers"]
    assert worker.name in queue(report, "high")["dead_workers"]


@pytest.mark.django_db
def test_report_lists_open_findings_by_code():
    make_finding(code="heartbeat_stale")
    make_finding(code="heartbeat_stale", severity="critical")
    make_finding(code="no_worker", subject="queue:low")
    make_finding(code="job_lost", resolved_at=timezone.now())
    findings = system_report.build_report()["findings"]
    assert findings["open"] == 3
    assert findings["by_code"] == {"heartbeat_stale": 2, "no_worker": 1}
    assert findings["by_severity"] == {"warning": 2, "critical": 1}
    rows = findings["findings"]
    assert [(row["code"], row["severity"]) for row in rows] == [
        ("heartbeat_stale", "critical"),
        ("heartbeat_stale", "warning"),
        ("no_worker", "warning"),
    ]


def test_settings_are_shown_with_secrets_masked(settings):
    settings.SECRET_KEY = "s3cret-key-that-must-not-leak-0123456789"
    settings.REDIS_URL = "redis://keel:hunter2@redis.internal:6379/0?password=hunter3&db=1"
    settings.RQ_QUEUES = {"default": {"URL": settings.REDIS_URL, "DEFAULT_TIMEOUT": 60}}
    settings.KEEL_API_TOKEN = "tok-abcdef"
    shown = json.dumps(system_report.masked_settings())
    for secret in ("s3cret-key", "hunter2", "hunter3", "tok-abcdef"):
        assert secret not in shown
    masked = system_report.masked_settings()
    assert masked["SECRET_KEY"] == system_report.MASK
    assert masked["REDIS_URL"].startswith("redis://keel:********@redis.internal:6379/0?")
    assert "db=1" in masked["REDIS_URL"]
    assert masked["RQ_QUEUES"]["default"]["URL"] == masked["REDIS_URL"]
    assert masked["KEEL_HEARTBEAT_SECONDS"] == settings.KEEL_HEARTBEAT_SECONDS
    database = system_report.mask(
        "DATABASES", {"default": {"PASSWORD": "pg-pass", "HOST": "db", "USER": "keel"}}
    )
    assert database == {"default": {"PASSWORD": "********", "HOST": "db", "USER": "keel"}}


@pytest.mark.django_db
def test_commands_print_json_markdown_and_text_without_secrets(capsys):
    call_command("system_report", "--json")
    report = json.loads(capsys.readouterr().out)
    assert {"versions", "settings", "checks", "queues", "workers", "findings"} <= set(report)
    assert [row["name"] for row in report["queues"]][:3] == ["high", "default", "low"]

    call_command("system_report", "--markdown")
    markdown = capsys.readouterr().out
    assert "## Queues" in markdown and "| queue | waiting |" in markdown

    call_command("system_report")
    text = capsys.readouterr().out
    assert "== Workers ==" in text and "== Settings (secrets masked) ==" in text
    secrets = [
        settings.SECRET_KEY,
        urlsplit(settings.REDIS_URL).password,
        settings.DATABASES["default"].get("PASSWORD"),
    ]
    for output in (json.dumps(report), markdown, text):
        for secret in filter(None, secrets):
            assert secret not in output


@pytest.mark.django_db
def test_report_still_answers_when_redis_is_down():
    report = system_report.build_report(unreachable_redis())
    assert report["redis"]["reachable"] is False
    assert "ConnectionError" in report["redis"]["error"]
    assert report["versions"]["redis_server"] == "unreachable"
    assert report["queues"] == [] and report["queues_error"]
    assert report["workers"] == []
    assert report["database"]["reachable"] is True
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["redis reachable"]["ok"] is False
    assert "REDIS_URL" in checks["redis reachable"]["fix"]
    assert checks["worker for queue default"]["fix"] == "Fix Redis first."


def test_report_reads_never_clean_up_rq_registries(clean_redis):
    """RQ's own ``count`` moves expired started jobs to failed: the report must not."""
    from rq.registry import StartedJobRegistry

    registry = StartedJobRegistry("default", connection=clean_redis)
    clean_redis.zadd(registry.key, {"keel-999-1:exec": 1})  # expired long ago
    report_queue = rq_state.read_queues(clean_redis, [], ["default"])[0]
    assert report_queue["registries"]["started"] == 1
    assert clean_redis.zcard(registry.key) == 1
    assert clean_redis.zcard("rq:failed:default") == 0


@pytest.mark.django_db
def test_a_frozen_worker_is_shown_frozen_and_listens_to_nothing(clean_redis):
    """A worker RQ still lists but whose heartbeat went stale (frozen with SIGSTOP, hung)
    takes no work: the report must not count it as listening to its queues."""
    from tests.diagnostics.test_worker_findings import register_worker

    register_worker(clean_redis, "w-frozen", pid=999_999, host="elsewhere", beat_seconds_ago=60)
    register_worker(clean_redis, "w-fine", pid=999_998, host="elsewhere", beat_seconds_ago=1)

    report = system_report.build_report(clean_redis)
    workers = {row["name"]: row for row in report["workers"]}
    assert workers["w-frozen"]["unresponsive"] and not workers["w-fine"]["unresponsive"]
    assert queue(report, "default")["workers"] == ["w-fine"]


@pytest.mark.django_db
def test_with_many_workers_every_one_is_counted_and_a_few_are_listed(clean_redis):
    """At 10 000 workers the page read every hash (seconds): now a pass inside Redis counts
    them all, and only the unwell ones and SHOWN_WORKERS others are read and listed."""
    from tests.diagnostics.test_worker_findings import register_worker

    many = system_report.SHOWN_WORKERS + 10
    for index in range(many):
        register_worker(clean_redis, f"w-{index:03d}", pid=7000 + index, host="far-host")
    register_worker(clean_redis, "w-quiet", pid=6999, host="far-host", beat_seconds_ago=60)

    report = system_report.build_report(clean_redis)

    assert report["workers_registered"] == many + 1
    listed = {row["name"] for row in report["workers"]}
    assert len(listed) == system_report.SHOWN_WORKERS + 1 and "w-quiet" in listed
    assert queue(report, "default")["live"] == many, "the frozen one does not count"
    [check] = [c for c in report["checks"] if c["name"] == "worker for queue default"]
    assert check["ok"] and check["detail"].startswith(f"{many} alive: ")
