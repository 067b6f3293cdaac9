"""RQ worker classes for Keel: JSON-only messages, Keel's own hard timeouts and stops,
and workers that outlive Redis and database outages.

``manage.py rqworker high default low`` uses KeelWorker (settings.RQ["WORKER_CLASS"]).
The node's process commits its own outcome (workflows/executor.py); the worker only
watches it.
"""

import contextlib
import errno
import logging
import mmap
import os
import select
import signal
import threading
import time

import redis
from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.utils import timezone
from rq import worker_registration
from rq.exceptions import InvalidJobOperation
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, Worker

from workflows import engine
from workflows.engine import statements as engine_statements
from workflows.models import NodeAttempt, NodeRun, Run
from workflows.runtime import dispatch, executor, outages
from workflows.runtime.executor import Phase

logger = logging.getLogger(__name__)

# How often a forking worker looks at its horse: its deadline, and whether its attempt
# is still the node's current one.
WATCH_SECONDS = 1.0


def warm_up() -> None:
    """Do once what every node attempt does first, matching no rows, then disconnect.

    Much is set up on first use in a process: the connection's helper objects, the
    fields' value conversions, the ORM's query compilation. Done before the first fork,
    every work horse inherits it instead of paying for it again (a few ms, measured in
    a forked horse).
    """
    now = timezone.now()
    # The claim's and the success's named statements, then the ORM's share of an outcome.
    engine_statements.claim(-1, 0, worker="", pid=0, host="", now=now)
    with transaction.atomic():
        engine_statements.succeed(-1, -1, 0, {}, now)
        engine_statements.still_moving(-1)
        list(Run.objects.select_for_update(no_key=True).filter(pk=-1))
        list(NodeRun.objects.select_for_update(no_key=True).filter(pk=-1))
        NodeAttempt.objects.filter(node_run_id=-1, number=0).update(updated_at=now)
        NodeRun.objects.filter(pk=-1).values("run_id", "status", "attempt").first()
    connections.close_all()


def keel_attempt(job) -> tuple[int, int] | None:
    """(node-run, attempt) of a Keel job, or None for any other job."""
    if job.func_name != dispatch.EXECUTOR_FUNC or len(job.args) != 2:
        return None
    return int(job.args[0]), int(job.args[1])


class RegistersAgain:
    """Register the worker again when Redis has forgotten it (a FLUSHALL, a restart, a
    failover to an empty replica): without this a live worker stays invisible until it
    restarts. Checked at a heartbeat, at most every REGISTRATION_CHECK_SECONDS."""

    REGISTRATION_CHECK_SECONDS = 5.0
    _registration_checked_at = float("-inf")

    def heartbeat(self, timeout=None, pipeline=None):
        if (
            not getattr(self, "_is_horse", False)
            and time.monotonic() - self._registration_checked_at >= self.REGISTRATION_CHECK_SECONDS
        ):
            self._registration_checked_at = time.monotonic()
            # The registry set, not the worker's hash: a busy worker's heartbeat writes
            # the hash again by itself after a flush, but never the set.
            if not self.connection.sismember(worker_registration.REDIS_WORKER_KEYS, self.key):
                self.log.warning(
                    "Worker %s: Redis no longer knows this worker (flushed or restarted?); "
                    "registering again.",
                    self.name,
                )
                with self.connection.pipeline() as registration:
                    registration.hset(self.key, mapping=self.serialize())
                    worker_registration.register(self, registration)
                    registration.execute()
        super().heartbeat(timeout, pipeline)


class OutlivesOutages:
    """A Keel worker's behaviour common to both classes.

    - Redis unreachable: RQ's worker quits on most Redis errors. A Keel worker logs one
      line, keeps the node it runs (whose process commits the outcome to the database,
      not to Redis), retries with backoff, and says when Redis is back.
    - It heartbeats to Redis at least every KEEL_HEARTBEAT_SECONDS, idle or busy, so a
      frozen worker shows as a stale heartbeat within seconds (``worker_unresponsive``).
    - Messages are JSON, never pickle, whatever ``--serializer`` says.
    """

    def __init__(self, *args, **kwargs):
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)
        self.job_monitoring_interval = settings.KEEL_HEARTBEAT_SECONDS
        self._redis_down_since: float | None = None

    @property
    def dequeue_timeout(self) -> int:
        return max(1, settings.KEEL_HEARTBEAT_SECONDS)

    def redis_failed(self, error: Exception, doing: str) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            self.log.warning(
                "Worker %s: Redis is unreachable (%s: %s) while %s; keeping on and retrying.",
                self.name,
                type(error).__name__,
                error,
                doing,
            )

    def redis_answered(self) -> None:
        if self._redis_down_since is not None:
            self.log.warning(
                "Worker %s: Redis answers again after %.1fs.",
                self.name,
                time.monotonic() - self._redis_down_since,
            )
            self._redis_down_since = None

    def heartbeat(self, timeout=None, pipeline=None):
        try:
            super().heartbeat(timeout, pipeline)
        except redis.RedisError as error:
            self.redis_failed(error, "sending its heartbeat")
        else:
            if pipeline is None:
                self.redis_answered()

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        wait = 1.0
        while True:
            try:
                found = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except redis.RedisError as error:
                self.redis_failed(error, "waiting for work")
                if not self._sleep_unless_stopped(wait):
                    return None
                wait = min(wait * 2, 30.0)
                continue
            self.redis_answered()
            return found

    def check_for_suspension(self, burst):
        try:
            super().check_for_suspension(burst)
        except redis.RedisError as error:
            self.redis_failed(error, "checking for a suspension")

    def run_maintenance_tasks(self):
        try:
            super().run_maintenance_tasks()
        except redis.RedisError as error:
            self.redis_failed(error, "cleaning RQ's registries")

    def execute_job(self, job, queue):
        """RQ's bookkeeping around a job talks to Redis; when that fails, the node's own
        outcome is in the database all the same, and the watchdog re-sends a node whose
        message was lost before it ran."""
        try:
            super().execute_job(job, queue)
        except redis.RedisError as error:
            self.redis_failed(error, f"doing RQ's bookkeeping for job {job.id}")

    def teardown(self):
        try:
            super().teardown()
        except redis.RedisError as error:
            self.redis_failed(error, "registering its shutdown")

    def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep, waking early for a stop request; False when one came."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self._stop_requested:
                return False
            time.sleep(min(0.2, until - time.monotonic()))
        return not self._stop_requested


class SharedPhase(Phase):
    """``executor.Phase`` on a page shared by a forking worker and its horses (an anonymous
    shared mapping made before the first fork): the horse writes where it is, the worker
    why it asks the horse to stop."""

    def __init__(self):
        self._page = mmap.mmap(-1, 2)

    @property
    def value(self) -> int:
        return self._page[0]

    def set(self, value: int) -> None:
        self._page[0] = value

    @property
    def stop_reason(self) -> int:
        return self._page[1]

    @stop_reason.setter
    def stop_reason(self, reason: int) -> None:
        self._page[1] = reason


class NoDeathPenalty(BaseDeathPenalty):
    """In a Keel horse the worker enforces the hard timeout (KeelWorker.monitor_work_horse)."""

    def setup_death_penalty(self):
        pass

    def cancel_death_penalty(self):
        pass


def _stop_the_node(signum, frame):
    """SIGTERM in a horse: the worker asks its node to stop (its timeout, or the attempt
    is superseded), or something outside Keel does. Raised in the node itself, so it stops
    wherever Python runs next; while the outcome is being committed it waits."""
    if executor.phase.value != Phase.RUNNING:
        return
    if executor.phase.stop_reason == Phase.SUPERSEDED:
        raise engine.AttemptSuperseded()
    if executor.phase.stop_reason == Phase.TIMEOUT:
        raise executor.HardTimeout()
    raise executor.StoppedFromOutside()  # no stop the worker asked for


class KeelWorker(OutlivesOutages, RegistersAgain, Worker):
    """The forking worker: each job runs in a fresh work horse, which Keel can stop.

    The horse claims the attempt, runs the node and commits its outcome itself. The
    worker holds no database connection when it forks, and watches the horse every
    second (``monitor_work_horse``): at the node's hard timeout, or once the attempt is
    no longer current (retried, cancelled, rolled back), it asks the horse to stop
    (SIGTERM), kills it KEEL_KILL_GRACE_SECONDS later if it has not, and commits the
    outcome of a horse that ended without one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._phase = SharedPhase()
        warm_up()

    def fork_work_horse(self, job, queue):
        # No database connection crosses a fork (a SQLite one must not).
        connections.close_all()
        self._phase.set(Phase.CLAIMING)
        self._phase.stop_reason = 0
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job, queue):
        if keel_attempt(job) is not None:
            executor.phase = self._phase
            self.death_penalty_class = NoDeathPenalty
        super().main_work_horse(job, queue)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        signal.signal(signal.SIGTERM, _stop_the_node)

    def perform_job(self, job, queue):
        try:
            return super().perform_job(job, queue)
        finally:
            if self._is_horse:
                # The horse leaves through os._exit(); say goodbye to the database first.
                connections.close_all()

    def monitor_work_horse(self, job, queue):
        """Watch the horse until it ends, every WATCH_SECONDS.

        1. Past the node's hard timeout (the job's timeout), or once the attempt is no
           longer the node's current one: ask the horse to stop (SIGTERM).
        2. KEEL_KILL_GRACE_SECONDS later, if it still runs the node: kill it (SIGKILL).
           A horse still claiming or already committing its outcome is left to finish.
        3. Heartbeat to Redis every KEEL_HEARTBEAT_SECONDS; a Redis outage changes nothing.
        4. Once it ended: if it committed no outcome, commit one for it (timed out, or
           ended without reporting), unless the engine had ended the attempt already; a
           superseded attempt's stop is noted in the run's history.
        """
        attempt = keel_attempt(job)
        if attempt is None:
            return super().monitor_work_horse(job, queue)
        job.started_at = rq_now()
        started = time.monotonic()
        deadline = started + (job.timeout or settings.KEEL_DEFAULT_TIMEOUT)
        grace = settings.KEEL_KILL_GRACE_SECONDS
        next_check = started + WATCH_SECONDS
        next_beat = started + settings.KEEL_HEARTBEAT_SECONDS
        asked_at: float | None = None
        killed = False
        with _EndOf(self.horse_pid) as horse:
            while not horse.ended_within(WATCH_SECONDS):
                now = time.monotonic()
                # Only a running node is stopped: a horse still claiming (the database
                # may be down) or committing its outcome is left to finish.
                if not killed and self._phase.value == Phase.RUNNING:
                    if asked_at is None:
                        if now >= deadline:
                            asked_at = self._ask_to_stop(Phase.TIMEOUT)
                        elif now >= next_check:
                            next_check = now + WATCH_SECONDS
                            if not _still_current(*attempt):
                                asked_at = self._ask_to_stop(Phase.SUPERSEDED)
                    elif now - asked_at >= grace:
                        self.log.warning(
                            "Worker %s: the horse of job %s ignored the stop request for %ss; "
                            "killing it.",
                            self.name,
                            job.id,
                            grace,
                        )
                        self.kill_horse(signal.SIGKILL)
                        killed = True
                if now >= next_beat:
                    next_beat = now + settings.KEEL_HEARTBEAT_SECONDS
                    self._beat_while_busy(job, now - started)
        status = horse.status
        self._last_horse_pid, self._horse_pid = self._horse_pid, 0
        if self._phase.value != Phase.DONE or self._phase.stop_reason == Phase.SUPERSEDED:
            self._report_for_horse(job, attempt, self._phase.stop_reason, killed, status)
        connections.close_all()
        with contextlib.suppress(redis.RedisError):
            self.set_current_job_working_time(0)
        if status == 0:
            return
        self._record_horse_end_in_rq(job, queue, status)

    def _ask_to_stop(self, reason: int) -> float:
        self._phase.stop_reason = reason
        self.log.warning(
            "Worker %s: asking the horse (pid %s) to stop: %s.",
            self.name,
            self.horse_pid,
            "its hard timeout passed" if reason == Phase.TIMEOUT else "its attempt was superseded",
        )
        self.kill_horse(signal.SIGTERM)
        return time.monotonic()

    def _beat_while_busy(self, job, working_for: float) -> None:
        try:
            self.set_current_job_working_time(working_for)
            self.maintain_heartbeats(job)
        except redis.RedisError as error:
            self.redis_failed(error, f"running job {job.id}")
        else:
            self.redis_answered()

    def _report_for_horse(self, job, attempt, reason: int, killed: bool, status: int | None):
        node_run_id, number = attempt
        timeout = job.timeout or settings.KEEL_DEFAULT_TIMEOUT
        grace = settings.KEEL_KILL_GRACE_SECONDS
        if reason == Phase.SUPERSEDED:
            # The engine ended the attempt and applies nothing of it; say that its
            # process is gone, and how, so the history shows the worker was freed.
            how = f"killed {grace} s after it ignored the request" if killed else "it stopped"
            note = (
                f"attempt {number} was superseded: worker {self.name} asked its process "
                f"(pid {self._last_horse_pid}) to stop, and {how}"
            )

            def act():
                engine.note_attempt(node_run_id, number, note, actor=self.name)

        else:
            if reason == Phase.TIMEOUT:
                failure = executor.timeout_failure(timeout, stopped=not killed, grace=grace)
            else:
                failure = executor.ended_without_report(describe_status(status))

            def act():
                if engine.attempt_is_running(node_run_id, number):
                    engine.fail_attempt(node_run_id, number, failure, actor=self.name)

        try:
            outages.retry(act, what=f"report the ended horse of node-run {node_run_id}")
        except DatabaseError:
            self.log.exception("Worker %s: could not report job %s", self.name, job.id)

    def _record_horse_end_in_rq(self, job, queue, status: int | None) -> None:
        """RQ's own record of a horse that did not exit cleanly (evidence, not truth)."""
        try:
            job_status = job.get_status()
        except InvalidJobOperation:
            return  # finished, and its result has expired
        if job_status not in (JobStatus.FINISHED, JobStatus.FAILED):
            job.ended_at = rq_now()
            self.handle_job_failure(
                job, queue=queue, exc_string=f"Work horse ended: {describe_status(status)}"
            )


def _still_current(node_run_id: int, attempt: int) -> bool:
    """Whether ``attempt`` is still the node's attempt to run (queued or running); True
    when the database cannot say (an outage must not stop work)."""
    try:
        row = NodeRun.objects.filter(pk=node_run_id).values_list("status", "attempt").first()
    except DatabaseError:
        outages.drop_broken_connections()
        return True
    if row is None:
        return False
    status, current = row
    return current == attempt and status in (NodeRun.Status.QUEUED, NodeRun.Status.RUNNING)


def describe_status(status: int | None) -> str:
    """How a child ended, from its wait status, in words."""
    if status is None:
        return "its exit status is unknown"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class _EndOf:
    """Waits for a child to end, a bounded time at once (a pidfd; polling where there is
    none), and reaps it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.status: int | None = None
        self._handle: int | None = None

    def __enter__(self):
        with contextlib.suppress(AttributeError, OSError):
            self._handle = os.pidfd_open(self.pid)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            os.close(self._handle)
        return False

    def ended_within(self, seconds: float) -> bool:
        if self._handle is not None:
            ready, _, _ = select.select([self._handle], [], [], seconds)
            return bool(ready) and self._reap(block=True)
        until = time.monotonic() + seconds
        while True:
            if self._reap(block=False):
                return True
            if time.monotonic() >= until:
                return False
            time.sleep(0.01)

    def _reap(self, *, block: bool) -> bool:
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True  # reaped elsewhere
        except OSError as error:
            if error.errno == errno.EINTR:
                return False
            raise
        if pid == 0:
            return False
        self.status = status
        return True


class KeelSimpleWorker(OutlivesOutages, RegistersAgain, SimpleWorker):
    """The non-forking worker: cheaper per job, but it cannot kill a node.

    The node runs in the worker process, which commits its outcome; the hard timeout is
    RQ's alarm (it interrupts Python code, not a node hung in C), and a stop request is
    seen by the node through ``ctx.should_stop()``. A thread, started once, keeps the
    worker's Redis heartbeat going while a node runs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._busy = threading.Event()
        self._beating: threading.Thread | None = None

    def execute_job(self, job, queue):
        if self._beating is None:
            self._beating = threading.Thread(
                target=self._beat_while_busy, name="keel-rq-heartbeat", daemon=True
            )
            self._beating.start()
        self._busy.set()
        try:
            super().execute_job(job, queue)
        finally:
            self._busy.clear()

    def _beat_while_busy(self) -> None:
        while True:
            self._busy.wait()
            time.sleep(settings.KEEL_HEARTBEAT_SECONDS)
            if self._busy.is_set():
                self.heartbeat()
