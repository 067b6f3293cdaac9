"""The faults bench/faults.py injects, one method each, and how a repetition is judged.

Each ``<fault>_once`` method starts a run, injects its fault and returns an Outcome:
detect and recover in seconds from the fault (what each measures: DESCRIPTIONS), lost,
doubled, wrong (findings on the run whose code names a cause that did not happen: any
code outside RIGHT_CODES) and failures (checks beyond the numbers: a worker died, an
attempt ended in the wrong way). ``Scenarios`` is mixed into ``bench.faults.Bench``,
which owns the processes and the runs.
"""

import contextlib
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

RUN_TIMEOUT = 120.0
DETECT_TARGET, RECOVER_TARGET, FREE_TARGET = 20.0, 30.0, 10.0
REDIS_DOWN_SECONDS = 2.0
HANG_TIMEOUT, FROZEN_TIMEOUT = 8, 120
KILL_GRACE_SECONDS = 5

FAULTS = ("kill", "flush", "redis_restart", "db_restart", "hang", "frozen_retry")
LABELS = {
    "kill": "kill -9 worker+horse",
    "flush": "FLUSHALL mid-run",
    "redis_restart": "Redis restart",
    "db_restart": "PostgreSQL restart",
    "hang": "hung node (8s timeout)",
    "frozen_retry": "retry of a frozen node",
}
DESCRIPTIONS = {
    "kill": "from the kill: first finding on the node / the node claimed again elsewhere",
    "flush": "from FLUSHALL: first job_lost / every node queued or running then "
    "claimed again or finished",
    "redis_restart": f"from killing redis-server (down {REDIS_DOWN_SECONDS:.0f}s, back empty): "
    "first job_lost / as FLUSHALL",
    "db_restart": "from `pg_ctl restart -m fast` (--db-down: stop, stay down, start): the "
    "db_unhealthy finding exists / every node running then finished or claimed again",
    "hang": f"from the node's {HANG_TIMEOUT}s hard timeout: first finding on it / attempt 2 "
    "started",
    "frozen_retry": "from the operator's retry: detect = the old horse's process is gone "
    "(worker free) / the new attempt started",
}
# detect, recover targets in seconds (frozen_retry's detect is "worker free").
TARGETS = {fault: (DETECT_TARGET, RECOVER_TARGET) for fault in FAULTS}
TARGETS["frozen_retry"] = (FREE_TARGET, RECOVER_TARGET)

# Finding codes that name a fault's real cause, or a true symptom of it.
RIGHT_CODES = {
    "kill": {"worker_lost", "heartbeat_stale"},
    "flush": {"job_lost"},
    "redis_restart": {"job_lost"},
    "db_restart": set(),  # the outage's db_unhealthy is about no run
    "hang": {"timeout_exceeded", "stalled", "overdue"},
    "frozen_retry": {"zombie_attempt", "stalled", "overdue"},
}


@dataclass
class Outcome:
    detect: float | None = None
    recover: float | None = None
    lost: bool = False
    doubled: int = 0
    wrong: int = 0
    findings: Counter = field(default_factory=Counter)  # codes of the findings on the run
    failures: list[str] = field(default_factory=list)
    note: str = ""


def _work(steps: int, step_seconds: float, **extra) -> dict:
    return {
        "type": "faults.work",
        "params": {"steps": steps, "step_seconds": step_seconds},
        "timeout": 120,
        "retries": {"max_attempts": 3, "backoff": 0},
        **extra,
    }


def _fan_out(name: str) -> dict:
    """Six nodes of 4 x 0.5 s, then a seventh after them all: on two workers some run
    while others wait."""
    return {
        "name": name,
        "nodes": {
            **{f"part{i}": _work(4, 0.5) for i in range(6)},
            "total": {
                "type": "faults.work",
                "params": {"steps": 1, "step_seconds": 0.1},
                "after": [f"part{i}" for i in range(6)],
            },
        },
    }


def _hang(name: str, timeout: int, max_attempts: int) -> dict:
    return {
        "name": name,
        "nodes": {
            "hang": {
                "type": "faults.hang",
                "timeout": timeout,
                "retries": {"max_attempts": max_attempts, "backoff": 0},
            }
        },
    }


KILL_DEFINITION = {"name": "Faults kill", "nodes": {"work": _work(12, 0.5)}}
FLUSH_DEFINITION = _fan_out("Faults flush")
REDIS_RESTART_DEFINITION = _fan_out("Faults redis restart")
DB_RESTART_DEFINITION = _fan_out("Faults db restart")
HANG_DEFINITION = _hang("Faults hang", HANG_TIMEOUT, max_attempts=2)
# One attempt: only the operator's retry makes a second.
FROZEN_DEFINITION = _hang("Faults frozen retry", FROZEN_TIMEOUT, max_attempts=1)


def quietly(check):
    """``check()``, or None while a store is down (the bench's own connection may have
    been cut by a restart: drop it, the next query reconnects)."""
    import redis
    from django.db import DatabaseError, connections

    try:
        return check()
    except (DatabaseError, redis.RedisError):
        for connection in connections.all(initialized_only=True):
            with contextlib.suppress(DatabaseError):
                connection.close()
        return None


def until(predicate, timeout: float, what: str, fail: bool = True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = quietly(predicate)
        if value:
            return value
        time.sleep(0.1)
    if fail:
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
    return None


def _seconds(later, earlier) -> float:
    return (later - earlier).total_seconds()


class Scenarios:
    """The faults; needs ``Bench``'s processes (ensure_workers, workers, kill_worker,
    check_workers, worker_log), runs (start_run, wait_finished, doubled) and stores."""

    # The faults -----------------------------------------------------------------------

    def kill_once(self) -> Outcome:
        """SIGKILL the worker running the node and its horse once it has made progress;
        start a replacement."""
        from django.utils import timezone

        from diagnostics.models import Finding
        from workflows.models import NodeAttempt, NodeRun

        self.ensure_workers(2)
        run = self.start_run(KILL_DEFINITION)
        node = NodeRun.objects.get(run=run, node_key="work")
        wanted_steps = random.randint(1, 3)
        until(lambda: _steps_done(node) >= wanted_steps, 60, "the node to make progress")
        victim = NodeAttempt.objects.get(node_run=node, number=1).worker
        killed_at = timezone.now()
        self.kill_worker(victim)
        self.start_worker(wait=False)  # the next repetition needs two again

        def detected():
            first = (
                Finding.objects.filter(node_run=node, first_seen__gte=killed_at)
                .order_by("first_seen")
                .first()
            )
            return first and _seconds(first.first_seen, killed_at)

        def recovered():
            again = (
                NodeAttempt.objects.filter(node_run=node, number__gt=1, started_at__isnull=False)
                .exclude(worker=victim)
                .order_by("number")
                .first()
            )
            return again and _seconds(again.started_at, killed_at)

        outcome = Outcome()
        outcome.detect, outcome.recover = self.measure(run, detected, recovered)
        return self.settle(run, "kill", outcome)

    def flush_once(self) -> Outcome:
        """FLUSHALL while some nodes run and others wait."""
        from django.utils import timezone

        self.ensure_workers(2)
        run = self.start_run(FLUSH_DEFINITION)
        until(lambda: _mixed(run), 60, "nodes running and queued at once")
        self.redis.client().flushall()
        flushed_at = timezone.now()
        at_flush = _active_attempts(run, ["queued", "running"])
        outcome = Outcome()
        outcome.detect, outcome.recover = self.measure(
            run,
            lambda: _first_finding(run, "job_lost", flushed_at),
            lambda: _all_again(at_flush, flushed_at),
        )
        return self.settle(run, "flush", outcome)

    def redis_restart_once(self) -> Outcome:
        """Kill redis-server while some nodes run and others wait; start it again, empty,
        on the same port after REDIS_DOWN_SECONDS. Both workers must live on and register
        again."""
        from django.utils import timezone

        self.ensure_workers(2)
        run = self.start_run(REDIS_RESTART_DEFINITION)
        until(lambda: _mixed(run), 60, "nodes running and queued at once")
        at_fault = _active_attempts(run, ["queued", "running"])
        fault_at = timezone.now()
        self.redis.restart(REDIS_DOWN_SECONDS)
        outcome = Outcome()
        outcome.detect, outcome.recover = self.measure(
            run,
            lambda: _first_finding(run, "job_lost", fault_at),
            lambda: _all_again(at_fault, fault_at),
        )
        alive = [name for name, process in self.workers.items() if process.poll() is None]
        if not until(lambda: self.registered(alive), 30, "the workers", fail=False):
            gone = sorted(set(alive) - self.registered_names())
            outcome.failures.append(f"not registered in Redis 30 s after it was back: {gone}")
        return self.settle(run, "redis_restart", outcome)

    def db_restart_once(self) -> Outcome:
        """``pg_ctl restart -m fast`` of the bench's own cluster while nodes run (with
        ``db_down``: stop it, keep it down that long, start it)."""
        from django.db import connections
        from django.db.models import Max
        from django.utils import timezone

        from diagnostics.models import Finding
        from workflows.models import NodeAttempt, RunEvent

        self.ensure_workers(2)
        run = self.start_run(DB_RESTART_DEFINITION)
        until(lambda: _mixed(run), 60, "nodes running and queued at once")
        at_fault = _active_attempts(run, ["running"])
        seen_before = Finding.objects.filter(code="db_unhealthy").aggregate(last=Max("pk"))["last"]
        fault_at, started = timezone.now(), time.monotonic()
        self.postgres.restart(self.db_down)
        connections.close_all()

        def detected():
            found = Finding.objects.filter(code="db_unhealthy", pk__gt=seen_before or 0)
            return time.monotonic() - started if found.exists() else None

        outcome = Outcome()
        outcome.detect, outcome.recover = self.measure(
            run, detected, lambda: _all_again(at_fault, fault_at)
        )
        outcome = self.settle(run, "db_restart", outcome)
        failed = Counter(
            f"{error_type}: {message.strip().splitlines()[0] if message.strip() else ''}"[:120]
            for error_type, message in NodeAttempt.objects.filter(node_run__run=run)
            .exclude(status__in=["succeeded", "queued", "running"])
            .values_list("error_type", "error_message")
        )
        waited = RunEvent.objects.filter(
            run=run, reason__contains="waited", reason__icontains="for the database"
        ).count()
        outcome.note = (
            f"{len(at_fault)} running at the restart; attempts ended otherwise than "
            f"succeeded: {_counts(failed) or 'none'}; reports that waited: {waited}"
        )
        return outcome

    def hang_once(self) -> Outcome:
        """A node blocks SIGTERM and sleeps; the worker must kill it KEEL_KILL_GRACE_SECONDS
        after its hard timeout and the retry policy run it again."""
        from diagnostics.models import Finding
        from workflows.models import NodeAttempt, NodeRun

        self.ensure_workers(2)
        run = self.start_run(HANG_DEFINITION)
        node = NodeRun.objects.get(run=run, node_key="hang")
        first = until(
            lambda: NodeAttempt.objects.filter(
                node_run=node, number=1, started_at__isnull=False
            ).first(),
            60,
            "the node to start",
        )
        deadline = first.started_at + timedelta(seconds=HANG_TIMEOUT)
        first_code = []

        def detected():
            finding = (
                Finding.objects.filter(node_run=node, first_seen__gte=first.started_at)
                .order_by("first_seen")
                .first()
            )
            if finding is None:
                return None
            first_code.append(finding.code)
            return _seconds(finding.first_seen, deadline)

        def recovered():
            again = NodeAttempt.objects.filter(
                node_run=node, number=2, started_at__isnull=False
            ).first()
            return again and _seconds(again.started_at, deadline)

        outcome = Outcome()
        outcome.detect, outcome.recover = self.measure(run, detected, recovered)
        outcome.note = f"first finding: {first_code[0] if first_code else 'none'}"
        first.refresh_from_db()
        if first.status != "timed_out" or "ignored the stop request" not in first.error_message:
            outcome.failures.append(
                f"attempt 1 ended {first.status}: {first.error_message!r} (expected timed_out, "
                f"killed {KILL_GRACE_SECONDS} s after its {HANG_TIMEOUT} s timeout)"
            )
        return self.settle(run, "hang", outcome)

    def frozen_retry_once(self) -> Outcome:
        """A node blocks SIGTERM and sleeps (timeout 120 s); the operator retries it. Its
        worker must notice the attempt was superseded and free itself (SIGTERM, then
        SIGKILL after the grace)."""
        import psutil
        from django.utils import timezone

        from workflows import operations
        from workflows.models import NodeAttempt, NodeRun

        self.ensure_workers(2)
        run = self.start_run(FROZEN_DEFINITION)
        node = NodeRun.objects.get(run=run, node_key="hang")
        first = until(
            lambda: NodeAttempt.objects.filter(
                node_run=node, number=1, started_at__isnull=False, pid__isnull=False
            ).first(),
            60,
            "the node to start",
        )
        # The node blocks its signals as it starts; give it a moment to be inside.
        time.sleep(max(0.0, 1.0 - _seconds(timezone.now(), first.started_at)))
        outcome = Outcome()
        if not psutil.pid_exists(first.pid):
            outcome.failures.append(f"the horse (pid {first.pid}) was gone before the retry")
        retried_at, started = timezone.now(), time.monotonic()
        operations.retry_node(
            run.pk,
            "hang",
            actor=operations.Actor.for_user(self.operator()),
            reason="bench.faults: the node is frozen",
            expected_attempt=1,
        )

        def freed():
            return None if psutil.pid_exists(first.pid) else time.monotonic() - started

        def recovered():
            again = NodeAttempt.objects.filter(
                node_run=node, number=2, started_at__isnull=False
            ).first()
            return again and _seconds(again.started_at, retried_at)

        outcome.detect, outcome.recover = self.measure(run, freed, recovered)
        if psutil.pid_exists(first.pid):
            outcome.failures.append(f"the old horse (pid {first.pid}) still runs; killed it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(first.pid, signal.SIGKILL)
        said = f"asking the horse (pid {first.pid}) to stop: its attempt was superseded"
        if said not in self.worker_log(first.worker):
            outcome.failures.append(f"worker {first.worker} never logged {said!r}")
        first.refresh_from_db()
        outcome.note = f"attempt 1 ended {first.status}"
        return self.settle(run, "frozen_retry", outcome)

    # Measuring ------------------------------------------------------------------------

    def measure(self, run, detected, recovered, timeout: float = 60.0):
        """Poll both measures until each has a value; give up after ``timeout``, or once
        the run has finished and the detection target has long passed."""
        values = {"detect": None, "recover": None}
        checks = {"detect": detected, "recover": recovered}
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            for name, check in checks.items():
                if values[name] is None:
                    value = quietly(check)
                    values[name] = None if value is None or value is False else float(value)
            if None not in values.values():
                break
            if time.monotonic() - started > DETECT_TARGET + 10 and quietly(lambda: _finished(run)):
                break
            time.sleep(0.1)
        return values["detect"], values["recover"]

    def settle(self, run, fault: str, outcome: Outcome) -> Outcome:
        """Wait for the run, then count: lost, doubled, findings and wrong ones, workers
        that died."""
        from diagnostics.models import Finding

        outcome.lost = not self.wait_finished(run)
        if outcome.lost:
            self.cancel_unfinished()
        outcome.doubled = self.doubled(run)
        outcome.findings = Counter(Finding.objects.filter(run=run).values_list("code", flat=True))
        outcome.wrong = sum(
            n for code, n in outcome.findings.items() if code not in RIGHT_CODES[fault]
        )
        outcome.failures += self.check_workers()
        return outcome


def _steps_done(node) -> int:
    """Checkpoints count steps at once (progress waits for the next heartbeat)."""
    from workflows.models import Checkpoint

    return Checkpoint.objects.filter(node_run=node, kind=Checkpoint.Kind.PROGRESS).count()


def _mixed(run) -> bool:
    from workflows.models import NodeRun

    statuses = set(NodeRun.objects.filter(run=run).values_list("status", flat=True))
    return {"running", "queued"} <= statuses


def _finished(run) -> bool:
    run.refresh_from_db(fields=["status"])
    return run.is_finished


def _active_attempts(run, statuses) -> dict[int, int]:
    from workflows.models import NodeRun

    return dict(NodeRun.objects.filter(run=run, status__in=statuses).values_list("pk", "attempt"))


def _first_finding(run, code: str, since):
    from diagnostics.models import Finding

    first = (
        Finding.objects.filter(run=run, code=code, first_seen__gte=since)
        .order_by("first_seen")
        .first()
    )
    return first and _seconds(first.first_seen, since)


def _all_again(at_fault: dict[int, int], since):
    """Seconds until every node in ``at_fault`` (node-run -> attempt) has an attempt
    started after ``since``, or has succeeded; None until then."""
    from workflows.models import NodeAttempt, NodeRun

    moments = []
    for pk, attempt in at_fault.items():
        node = NodeRun.objects.only("status", "finished_at").get(pk=pk)
        later = (
            NodeAttempt.objects.filter(node_run_id=pk, number__gte=attempt, started_at__gt=since)
            .order_by("started_at")
            .values_list("started_at", flat=True)
            .first()
        )
        if later is None and node.status == "succeeded":
            later = node.finished_at
        if later is None:
            return None
        moments.append(_seconds(later, since))
    return max(moments, default=0.0)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key or '?'} x{n}" for key, n in counter.most_common())
