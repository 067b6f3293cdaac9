"""The alert rules and the metrics they read, checked with promtool.

promtool comes from Debian's ``prometheus`` package. Without it these tests skip and say
so, except in CI (CI=true), where a missing promtool is a failure.
"""

import os
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.utils import timezone

from diagnostics import metrics
from tests.diagnostics.test_pages import make_finding
from workflows import operations
from workflows.deployments import judging
from workflows.models import Run

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
ALERT_TESTS = RULES_DIR / "alerts_test.yml"
INSTALL = "apt-get install -y prometheus (Debian's package ships promtool)"


@pytest.fixture
def promtool():
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"promtool is required in CI and is not installed: {INSTALL}")
    pytest.skip(f"promtool is not installed; {INSTALL} to run these checks")


def run(promtool, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=RULES_DIR
    )


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alert_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests(promtool):
    result = run(promtool, "test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_sees_it_fire():
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} == tested


def test_the_required_alerts_are_there():
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "workflow_runs_finished_5m" in expressions["KeelWorkflowFailureRateHigh"]
    assert "> 0.10" in expressions["KeelWorkflowFailureRateHigh"]
    assert "workflow_queue_size" in expressions["KeelQueueBacklog"]
    assert "> 3600" in expressions["KeelRunTooLong"]
    assert "nodes_stuck" in expressions["KeelNodeStuck"]
    assert "workers_alive" in expressions["KeelQueueWithoutWorker"]
    assert 'workflow_canary_failure_rate{role="canary"}' in expressions["KeelCanaryFailing"]
    assert 'workflow_canary_failure_rate{role="baseline"}' in expressions["KeelCanaryFailing"]


@pytest.fixture
def busy_keel(start_run, make_version, clean_redis):
    """Data that makes every Keel metric the alerts read appear in a scrape."""
    run = start_run({"name": "Scraped", "nodes": {"a": {"type": "keel.noop"}}})
    Run.objects.filter(pk=run.pk).update(started_at=timezone.now() - timedelta(hours=2))
    finished = start_run({"name": "Scraped", "nodes": {"a": {"type": "keel.noop"}}})
    now = timezone.now()
    Run.objects.filter(pk=finished.pk).update(status=Run.Status.FAILED, finished_at=now)
    node = run.nodes.get()
    make_finding(node_run=node, ago=200)
    make_finding(
        code="worker_lost",
        evidence={"since": (now - timedelta(seconds=10)).isoformat()},
        first_seen=now - timedelta(seconds=5),
        resolved_at=now,
    )
    # A canary of v2 in its first step, with the watchdog's analysis of it (workflow_canary_*).
    nodes = {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop"}}
    make_version({"name": "Scraped", "nodes": nodes, "deploy": {"strategy": "canary"}})
    routed = [operations.start_run("scraped", actor="test") for _ in range(20)]
    Run.objects.filter(pk__in=[r.pk for r in routed]).update(
        status=Run.Status.SUCCEEDED, started_at=now - timedelta(seconds=1), finished_at=now
    )
    judging.advance_in_flight()


# Lint findings about metrics that are not Keel's, each with where it comes from. Anything
# else promtool reports fails the test.
THIRD_PARTY_LINT = {
    # django-rq 4.2 (django_rq/contrib/prometheus.py) names a Summary "..._total"; it lands
    # in the default registry when config/urls.py includes django_rq.urls.
    "rq_request_processing_seconds_total": 'non-counter metrics should not have "_total" suffix',
}


@pytest.mark.django_db
def test_a_real_scrape_passes_promtool_check_metrics(promtool, client, busy_keel):
    body = client.get("/metrics").content.decode()
    result = run(promtool, "check", "metrics", stdin=body)
    # Exit 1 would be an exposition that does not parse; 3 is lint findings only.
    assert result.returncode in (0, 3), result.stdout + result.stderr
    for problem in filter(None, (result.stdout + result.stderr).splitlines()):
        name, _, message = problem.partition(" ")
        assert THIRD_PARTY_LINT.get(name) == message, f"promtool: {problem}"


@pytest.mark.django_db
def test_keels_own_metrics_are_lint_clean(promtool, client, busy_keel):
    body = client.get("/metrics").content.decode()
    ours = tuple(metrics.METRICS)
    keel_only = "\n".join(
        line
        for line in body.splitlines()
        if (line.split(" ")[2] if line.startswith("# ") else line).startswith(ours)
    )
    assert "workflow_runs_finished_5m" in keel_only and "workers_alive" in keel_only
    result = run(promtool, "check", "metrics", stdin=keel_only + "\n")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
def test_every_metric_the_alerts_read_is_in_a_real_scrape(client, busy_keel):
    body = client.get("/metrics").content.decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1] != "#"}
    functions = {"max", "min", "sum", "by", "delta", "clamp_min", "rate", "increase"}
    for rule in alert_rules():
        names = re.findall(r"\b([a-z_][a-z0-9_]*)\b(?=\s*[\[{)]|\s*[=<>])", rule["expr"])
        names = set(names) - functions
        names = {name for name in names if "_" in name and name != "by"}
        assert names, rule["alert"]
        assert names <= exposed, f"{rule['alert']} reads {names - exposed}, not exported"
