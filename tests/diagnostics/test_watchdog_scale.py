"""A tick's cost follows what is wrong, not what is running (issue #12).

Healthy running nodes are never loaded: ten times as many of them cost the tick no more
queries. Open findings that say the same thing are not rewritten: ten times as many cost
no more queries either, only their ``last_seen`` moves (one update, of a bounded number
of them). Timing is left to
bench/scale.py; these tests count.
"""

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rq.utils import utcformat

from diagnostics import detectors, findings, health, repairs, watchdog
from diagnostics.detectors import registry
from diagnostics.models import Finding
from workflows import engine
from workflows.models import NodeAttempt, NodeRun
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

FAR_HOST = "far-away-host"  # not this one: the watchdog cannot look at its processes
WORKER = "w-far"


def wide(count: int) -> dict:
    return {
        "name": f"Wide {count} {timezone.now().timestamp()}",
        "nodes": {f"n{i:03d}": {"type": "test.record", "timeout": 3600} for i in range(count)},
    }


def running_nodes(start_run, redis, count: int, *, beat_ago: float = 0) -> list[NodeRun]:
    """``count`` nodes claimed by a worker on another host that RQ knows and that beats to
    RQ; their jobs run (RQ's started registry and job hashes say so); their last database
    heartbeat was ``beat_ago`` seconds ago."""
    run = start_run(wide(count))
    nodes = list(NodeRun.objects.filter(run=run))
    beat = timezone.now() - timedelta(seconds=beat_ago)
    for node in nodes:
        assert engine.claim_attempt(node.pk, 1, worker=WORKER, pid=4242, host=FAR_HOST)
    NodeRun.objects.filter(run=run).update(heartbeat_at=beat)
    with redis.pipeline() as pipe:
        for node in nodes:
            job_id = dispatch.job_id(node.pk, 1)
            pipe.hset(f"rq:job:{job_id}", mapping={"status": "started", "worker_name": WORKER})
            pipe.zadd("rq:wip:default", {f"{job_id}:exec-1": timezone.now().timestamp() + 3600})
        pipe.execute()
    return nodes


def register_far_worker(redis) -> None:
    redis.hset(
        f"rq:worker:{WORKER}",
        mapping={
            "queues": "default",
            "hostname": FAR_HOST,
            "pid": 4242,
            "state": "busy",
            "last_heartbeat": utcformat(timezone.now()),
        },
    )
    redis.sadd("rq:workers", f"rq:worker:{WORKER}")


def tick_queries() -> int:
    with CaptureQueriesContext(connection) as queries:
        report = watchdog.tick()
    assert report.acted and not report.failed, str(report)
    return len(queries)


def test_healthy_running_nodes_cost_the_tick_nothing(start_run, clean_redis):
    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 3)
    watchdog.tick()
    few = tick_queries()

    running_nodes(start_run, clean_redis, 30)
    many = tick_queries()

    assert many == few
    assert not Finding.objects.filter(resolved_at__isnull=True).exists()
    ctx = detectors.Context(now=timezone.now())
    detectors.run_all(ctx)
    assert ctx.suspects == [], "no detector's condition holds for a healthy node"
    assert ctx.running_without_job == set(), "RQ has their jobs, started"


def test_open_findings_that_say_the_same_are_not_rewritten(start_run, clean_redis):
    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 3, beat_ago=60)
    watchdog.tick()  # opens 3 heartbeat_stale findings
    few = tick_queries()

    running_nodes(start_run, clean_redis, 30, beat_ago=60)
    opened = str(watchdog.tick())  # opens 30 more
    assert opened.count("\n  opened ") == 21, "20 named, then the rest counted"
    assert opened.endswith("opened   … and 10 more")
    watchdog.tick()  # reads the last of the new nodes' duration histories (a few per tick)
    before = {f.pk: (f.digest, f.title, f.evidence, f.last_seen) for f in Finding.objects.all()}
    register_far_worker(clean_redis)  # the worker beats to RQ again, as a live one does
    many = tick_queries()

    assert many == few
    after = {f.pk: (f.digest, f.title, f.evidence, f.last_seen) for f in Finding.objects.all()}
    assert len(after) == 33
    assert {f.code for f in Finding.objects.all()} == {"heartbeat_stale"}
    for pk, (digest, title, evidence, last_seen) in after.items():
        assert digest == before[pk][0], "what it says did not change"
        assert (title, evidence) == before[pk][1:3], "so it was not rewritten"
        assert last_seen > before[pk][3], "seen again this tick"


def test_last_seen_moves_for_a_bounded_number_seen_longest_ago_first(
    start_run, clean_redis, monkeypatch
):
    monkeypatch.setattr(findings, "LAST_SEEN_BATCH", 10)
    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 30, beat_ago=60)
    watchdog.tick()  # opens 30 heartbeat_stale findings
    ids = sorted(Finding.objects.values_list("pk", flat=True))
    long_ago = timezone.now() - timedelta(hours=1)
    Finding.objects.filter(pk__in=ids[:15]).update(last_seen=long_ago)
    Finding.objects.filter(pk__in=ids[15:]).update(last_seen=long_ago + timedelta(minutes=1))
    register_far_worker(clean_redis)

    watchdog.tick()

    moved = set(
        Finding.objects.filter(last_seen__gt=long_ago + timedelta(minutes=1)).values_list(
            "pk", flat=True
        )
    )
    assert len(moved) == 10
    assert moved < set(ids[:15]), "those seen longest ago first"


def test_a_finding_whose_words_change_is_rewritten(start_run, clean_redis):
    register_far_worker(clean_redis)
    [node] = running_nodes(start_run, clean_redis, 1, beat_ago=60)
    watchdog.tick()
    finding = Finding.objects.get(code="heartbeat_stale")

    # A late heartbeat, still stale: the finding now says since when it is silent.
    NodeRun.objects.filter(pk=node.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=30))
    watchdog.tick()

    rewritten = Finding.objects.get(pk=finding.pk)
    assert rewritten.resolved_at is None
    assert rewritten.digest != finding.digest
    assert rewritten.title != finding.title
    assert rewritten.evidence["heartbeat_at"] != finding.evidence["heartbeat_at"]


def test_the_system_page_and_metrics_say_how_long_the_last_tick_took(
    clean_redis, client, django_user_model
):
    staff_client = client
    staff_client.force_login(django_user_model.objects.create_superuser("boss", "b@x.org", "pw"))
    watchdog.tick()

    status = health.watchdog_status(clean_redis)
    page = staff_client.get("/system/").content.decode()
    metrics = staff_client.get("/metrics").content.decode()

    assert status["alive"] is True
    assert 0 < status["tick_seconds"] < 60
    assert re.search(r"the last acting tick took \d+ ms", page)
    [sample] = [line for line in metrics.splitlines() if line.startswith("keel_watchdog_tick_")]
    assert float(sample.split()[-1]) == status["tick_seconds"]


def tick_with_first(detect, monkeypatch) -> watchdog.TickReport:
    """A tick whose first detector is ``detect`` (one that takes as long as the lock
    lives, and whatever happens to the lock meanwhile): the lock is renewed after it."""
    monkeypatch.setattr(watchdog, "LOCK_RENEW_SHARE", 0)
    first = registry.Detector("test_first", detect, needs_redis=False)
    registry.DETECTORS.insert(0, first)
    try:
        return watchdog.tick()
    finally:
        registry.DETECTORS.remove(first)


def test_a_tick_that_outlives_its_lock_stops_before_acting_beside_another(
    start_run, clean_redis, monkeypatch
):
    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 1, beat_ago=60)

    def lock_expires_and_another_takes_it(ctx):
        clean_redis.set(watchdog.LOCK_NAME, "another watchdog's token")
        return []

    report = tick_with_first(lock_expires_and_another_takes_it, monkeypatch)

    assert report.redis_failed.startswith("this tick outlived its 30 s lock")
    assert not Finding.objects.exists(), "it stopped before recording anything"
    assert clean_redis.get(watchdog.LOCK_NAME) == b"another watchdog's token"


def test_a_mass_repair_is_spread_over_ticks(start_run, clean_redis, monkeypatch):
    monkeypatch.setattr(repairs, "REPAIR_SECONDS", 0)  # out of time after the first
    nodes = running_nodes(start_run, clean_redis, 3, beat_ago=60)  # RQ has no such worker

    first = watchdog.tick()

    assert len(first.repairs) == 1 and first.repairs_left == 2
    assert "(2 left for the next tick)" in str(first)
    watchdog.tick()
    watchdog.tick()
    abandoned = NodeAttempt.objects.filter(
        node_run__in=nodes, number=1, status=NodeAttempt.Status.ABANDONED
    )
    assert abandoned.count() == 3
    assert Finding.objects.filter(code="worker_lost", repaired_at__isnull=False).count() == 3


def test_a_tick_whose_lock_was_evicted_takes_it_again_and_goes_on(
    start_run, clean_redis, monkeypatch
):
    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 1, beat_ago=60)

    def evicted(ctx):  # as Redis under an allkeys-* maxmemory policy may do
        clean_redis.delete(watchdog.LOCK_NAME)
        return []

    report = tick_with_first(evicted, monkeypatch)

    assert not report.failed, str(report)
    assert Finding.objects.filter(code="heartbeat_stale", resolved_at=None).count() == 1


def worker_hashes_read(monkeypatch) -> list[str]:
    """Record the worker hashes a tick reads (HGETALL or HMGET rq:worker:…), pipelined
    or not."""
    from redis.client import Pipeline, Redis

    read = []

    def note(args):
        if args and args[0] in ("HGETALL", "HMGET") and str(args[1]).startswith("rq:worker:"):
            read.append(str(args[1]).removeprefix("rq:worker:"))

    plain, queued = Redis.execute_command, Pipeline.pipeline_execute_command

    def execute_command(self, *args, **options):
        note(args)
        return plain(self, *args, **options)

    def pipeline_execute_command(self, *args, **options):
        note(args)
        return queued(self, *args, **options)

    monkeypatch.setattr(Redis, "execute_command", execute_command)
    monkeypatch.setattr(Pipeline, "pipeline_execute_command", pipeline_execute_command)
    return read


def test_a_tick_reads_no_healthy_worker_only_those_gone_quiet(start_run, clean_redis, monkeypatch):
    from tests.diagnostics.test_worker_findings import register_worker

    for index in range(20):
        register_worker(clean_redis, f"w-fine-{index}", pid=5000 + index, host=FAR_HOST)
    running_nodes(start_run, clean_redis, 3)  # run by w-far, which beats
    register_far_worker(clean_redis)
    read = worker_hashes_read(monkeypatch)

    watchdog.tick()
    assert read == [], "a worker that beats to RQ is counted inside Redis, never read"

    register_worker(clean_redis, "w-quiet", pid=4343, host=FAR_HOST, beat_seconds_ago=60)
    read.clear()
    watchdog.tick()

    assert read == ["w-quiet"]
    [found] = Finding.objects.filter(code="worker_unresponsive", resolved_at__isnull=True)
    assert found.subject == "worker:w-quiet"


def test_silent_nodes_of_a_live_busy_worker_are_reported_without_reading_it(
    start_run, clean_redis, monkeypatch
):
    nodes = running_nodes(start_run, clean_redis, 3, beat_ago=60)
    register_far_worker(clean_redis)
    job = dispatch.job_id(nodes[0].pk, 1)
    clean_redis.hset(f"rq:worker:{WORKER}", "current_job", job)
    read = worker_hashes_read(monkeypatch)

    watchdog.tick()

    assert read == [], "the sweep vouches for a busy worker that beats to RQ"
    stale = {f.node_run_id: f for f in Finding.objects.filter(code="heartbeat_stale")}
    assert set(stale) == {node.pk for node in nodes}
    evidence = stale[nodes[0].pk].evidence
    assert evidence["rq_worker"]["current_job"] == job
    assert evidence["rq_worker"]["rq_heartbeat_within_seconds"] > 0

    # Once it goes quiet it is read in full, and what the findings say changes.
    clean_redis.hset(
        f"rq:worker:{WORKER}", "last_heartbeat", utcformat(timezone.now() - timedelta(minutes=5))
    )
    watchdog.tick()
    assert read == [WORKER]


def test_when_a_condition_began_is_a_column_for_time_to_detect(start_run, clean_redis):
    """/metrics and the workflow page compute time to detect from ``began_at``; casting
    every finding's evidence["since"] cost a mass incident's scrape half a second."""
    from datetime import datetime

    from diagnostics.models import began_from

    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 1, beat_ago=60)
    watchdog.tick()

    finding = Finding.objects.get(code="heartbeat_stale")
    assert finding.began_at == datetime.fromisoformat(finding.evidence["since"])
    assert began_from({"since": "2026-12-05T11:43:14.5Z"}) is not None
    for unusable in ({"since": "yesterday"}, {"since": "2026-12-05T11:43:14"}, {}, None):
        assert began_from(unusable) is None, unusable


def test_a_short_tick_renews_its_lock_only_once_a_third_of_its_life_passed(
    start_run, clean_redis, monkeypatch
):
    register_far_worker(clean_redis)
    running_nodes(start_run, clean_redis, 1, beat_ago=60)
    renewals = []
    monkeypatch.setattr(watchdog, "_renew", renewals.append)

    watchdog.tick()
    assert renewals == [], "renewing after each step waited for Redis each time"

    monkeypatch.setattr(watchdog, "LOCK_RENEW_SHARE", 0)
    watchdog.tick()
    assert len(renewals) > len(registry.DETECTORS), "between every step once it is due"
