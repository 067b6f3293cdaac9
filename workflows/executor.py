"""The RQ entry point: run one attempt of one node-run.

The job is a thin wrapper (claim, run, report): every state change is the engine's.
"""

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback as traceback_module
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections
from rq import get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from workflows import dispatch, engine, heartbeat, registry
from workflows.context import NodeContext

if TYPE_CHECKING:
    from workflows.companion import Companion
    from workflows.companion import SentClaim as CompanionClaim

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerClaim:
    """A claim the worker process sent for the job it is about to run (workflows/worker.py)."""

    sent: "engine.SentClaim | CompanionClaim"
    # A forking worker's: the work horse runs the node and the worker reports for it.
    reported_by_worker: bool


# By (node-run, attempt). A simple worker sends the claim before RQ's bookkeeping for
# the job, a forking worker before it forks: the horse inherits the claim, read.
worker_claims: dict[tuple[int, int], WorkerClaim] = {}
# A simple worker's success as the job sent it, read after RQ's bookkeeping.
sent_successes: dict[tuple[int, int], engine.SentSuccess] = {}


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as the process that ran the node saw it."""

    output: Any = None
    failure: engine.Failure | None = None
    superseded: bool = False

    def as_json(self) -> dict:
        return {**asdict(self), "failure": asdict(self.failure) if self.failure else None}

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        failure = data.get("failure")
        if failure:
            failure = engine.Failure(**{**failure, "names": tuple(failure["names"])})
        return cls(**{**data, "failure": failure})

    def summary(self) -> dict:
        if self.superseded:
            return {"superseded": True}
        if self.failure:
            return {"failed": self.failure.error_type}
        return {"succeeded": True}


def run_attempt(node_run_id: int, attempt: int) -> dict:
    """The RQ job: claim the attempt, run the node with a heartbeat beside it, report.

    1. Claim: compare-and-set queued → running for this attempt; a stale message
       (already claimed, cancelled, superseded) returns without running anything.
       A Keel worker has sent the claim already, before RQ's own bookkeeping for the
       job, so the database answers while RQ talks to Redis (``worker_claims``).
    2. Have the process's heartbeat watch the attempt; run the node function with ``ctx``.
    3. Report success (output) or failure (error, traceback; timed out on RQ's hard
       timeout or the node's SoftTimeout) to the engine, which decides what is next.
       In a forking worker's horse the outcome is the job's result instead, and the
       worker reports it (report_after_horse): most horses never open a connection.
       In a simple worker a success is sent, and read after RQ's bookkeeping
       (finish_job).
    """
    started = time.monotonic()
    key = (node_run_id, attempt)
    made = worker_claims.pop(key, None)
    if made is None:
        check_connections()
        claim = engine.claim_attempt(
            node_run_id, attempt, worker=_worker_name(), pid=os.getpid(), host=socket.gethostname()
        )
    else:
        claim = made.sent.claim()
    if claim is None:
        return {"stale": True}
    outcome = run_claimed(claim, started)
    if made is not None and made.reported_by_worker:
        return {"outcome": outcome.as_json()}
    sent = send_report(claim, outcome, actor=_worker_name())
    if sent is not None:
        if made is not None:
            sent_successes[key] = sent
        else:
            sent.applied()
    return outcome.summary()


CONNECTION_CHECK_SECONDS = 1.0
_connections_checked_at = float("-inf")


def check_connections() -> None:
    """A worker lives for days: drop connections the database has closed meanwhile, or
    that outlived KEEL_DB_CONN_MAX_AGE.

    After an error at once, otherwise at most every CONNECTION_CHECK_SECONDS: on
    PostgreSQL a check costs a round trip (CONN_HEALTH_CHECKS), and paying it before
    every job of a busy worker cost more than a node's claim.
    """
    global _connections_checked_at
    now = time.monotonic()
    errors = any(db.errors_occurred for db in connections.all(initialized_only=True))
    if errors or now - _connections_checked_at >= CONNECTION_CHECK_SECONDS:
        close_old_connections()
        _connections_checked_at = now


def run_claimed(claim: engine.Claim, started: float) -> Outcome:
    """Run a claimed node with its heartbeat; never raises for what the node does."""
    ctx = NodeContext(claim, started_monotonic=started)
    beside = heartbeat.for_this_process()
    beside.watch(ctx, claim.node_run_id, claim.attempt)
    try:
        output = registry.get(claim.node_type)(ctx)
        _cancel_hard_timeout()
        outcome = Outcome(output=_checked_output(output))
    except engine.AttemptSuperseded:
        _cancel_hard_timeout()
        logger.info(
            "Node-run %s attempt %s stopped: no longer current.", claim.node_run_id, claim.attempt
        )
        outcome = Outcome(superseded=True)
    except JobTimeoutException as error:
        outcome = Outcome(
            failure=engine.Failure(
                error_type="HardTimeout",
                message=f"killed after the hard timeout of {claim.timeout_seconds}s ({error})",
                traceback=traceback_module.format_exc(),
                timed_out=True,
                names=("HardTimeout", "TimeoutError"),
            )
        )
    except Exception as error:
        _cancel_hard_timeout()
        outcome = Outcome(failure=_failure_from(error, claim))
    finally:
        beside.unwatch()
    ctx.flush_logs(final=True)
    return outcome


def report(claim: engine.Claim, outcome: Outcome, *, actor: str) -> None:
    sent = send_report(claim, outcome, actor=actor)
    if sent is not None:
        sent.applied()


def send_report(claim: engine.Claim, outcome: Outcome, *, actor: str) -> engine.SentSuccess | None:
    """Report an outcome; a success may still be on its way (``applied()`` reads it)."""
    if outcome.superseded:
        return None
    if outcome.failure:
        engine.fail_attempt(
            claim.node_run_id, claim.attempt, outcome.failure, actor=actor, run_id=claim.run_id
        )
        return None
    return engine.send_success(
        claim.node_run_id, claim.attempt, outcome.output, actor=actor, facts=claim.facts
    )


# --- The Keel worker's side (workflows/worker.py) ----------------------------------------------


def send_claim(
    job,
    *,
    worker: str,
    host: str,
    reported_by_worker: bool,
    companion: "Companion | None" = None,
) -> tuple[int, int] | None:
    """In a Keel worker, before RQ's bookkeeping for a job: send the claim of the
    attempt it carries, and return without waiting for the database.

    A forking worker has its companion make the claim (workflows/companion.py); a simple
    worker makes it on its own connection. Returns the (node-run, attempt) key, or None
    for a job that is not Keel's or a claim that could not be sent (the job then claims
    for itself and meets the same error, which RQ records).
    """
    if job.func_name != dispatch.EXECUTOR_FUNC or len(job.args) != 2:
        return None
    key = (int(job.args[0]), int(job.args[1]))
    try:
        if companion is not None:
            sent = companion.send_claim(*key, worker=worker, pid=os.getpid(), host=host)
        else:
            check_connections()
            sent = engine.send_claim(*key, worker=worker, pid=os.getpid(), host=host)
    except DatabaseError:
        logger.exception("Could not claim node-run %s attempt %s", *key)
        return None
    worker_claims[key] = WorkerClaim(sent, reported_by_worker)
    return key


def receive_claim(key: tuple[int, int]) -> None:
    """Read the answer to a claim sent by ``send_claim``: a forking worker does before it
    forks, so that the horse inherits the claim itself. On an error the claim is
    forgotten and the horse claims for itself."""
    made = worker_claims.get(key)
    if made is None:
        return
    try:
        made.sent.claim()
    except DatabaseError:
        logger.exception("Could not claim node-run %s attempt %s before forking", *key)
        del worker_claims[key]


def record_work_horse(key: tuple[int, int], pid: int, companion: "Companion") -> None:
    """The horse's pid on the attempt: diagnostics look at the process that runs the node."""
    made = worker_claims.get(key)
    if made is not None and made.sent.claim() is not None:
        try:
            companion.note_pid(*key, pid)
        except DatabaseError:
            logger.exception("Could not note the work horse of node-run %s attempt %s", *key)


def report_after_horse(job, key: tuple[int, int], *, worker: str, companion: "Companion") -> None:
    """After the horse has ended: have the companion report it (``report_ended_job``)
    while the worker goes on to its next job."""
    made = worker_claims.pop(key, None)
    if made is None:
        return
    try:
        claim = made.sent.claim()
        if claim is not None:
            companion.report(claim, job.id, actor=worker)
    except DatabaseError:
        # The attempt stays running; the watchdog finds the job ended without a report.
        logger.exception("Could not report node-run %s attempt %s", *key)


def report_ended_job(claim: engine.Claim, job_id: str, *, actor: str) -> None:
    """Report the outcome a work horse returned as its job's result or, when it returned
    none (killed at the hard timeout, stopped, crashed, never started), a failure
    saying so, unless the attempt has ended meanwhile (stopped by the engine)."""
    job = Job(id=job_id, connection=dispatch.redis_connection(), serializer=JSONSerializer)
    result = job.latest_result()
    returned = result.return_value if result is not None else None
    if isinstance(returned, dict) and returned.get("outcome"):
        report(claim, Outcome.from_json(returned["outcome"]), actor=actor)
    elif engine.attempt_is_running(claim.node_run_id, claim.attempt):
        report(claim, Outcome(failure=_horse_failure(claim, result)), actor=actor)


def finish_job(key: tuple[int, int], *, worker: str) -> None:
    """After RQ's bookkeeping for a simple worker's job: read the success the job sent;
    if RQ never called the job (it failed before), report the claimed attempt failed."""
    sent = sent_successes.pop(key, None)
    made = worker_claims.pop(key, None)
    try:
        if sent is not None:
            sent.applied()
        claim = made.sent.claim() if made is not None else None
        if claim is not None:
            report(claim, Outcome(failure=_not_started_failure()), actor=worker)
    except (DatabaseError, redis.RedisError):
        # The attempt stays running; the watchdog finds the job ended without a report.
        logger.exception("Could not report node-run %s attempt %s", *key)


def _not_started_failure() -> engine.Failure:
    return engine.Failure(
        error_type="JobNotStarted",
        message="the worker claimed the attempt, but RQ failed before running the job (see "
        "the worker's log)",
        names=("JobNotStarted",),
        ignore_retry_on=True,
    )


def _horse_failure(claim: engine.Claim, result) -> engine.Failure:
    detail = (getattr(result, "exc_string", "") or "").strip()
    timed_out = "HardTimeout" in detail or "JobTimeoutException" in detail
    return engine.Failure(
        error_type="HardTimeout" if timed_out else "WorkHorseEnded",
        message=(
            f"the work horse ended without reporting (killed after the hard timeout of "
            f"{claim.timeout_seconds}s)"
            if timed_out
            else "the work horse ended without reporting: "
            + (detail.splitlines()[-1] if detail else "killed or crashed")
        ),
        traceback=detail[-50_000:],
        timed_out=timed_out,
        names=("HardTimeout", "TimeoutError") if timed_out else ("WorkHorseEnded",),
    )


def _failure_from(error: Exception, claim: engine.Claim) -> engine.Failure:
    names = tuple(cls.__name__ for cls in type(error).__mro__ if cls not in (object, BaseException))
    if isinstance(error, registry.SoftTimeout):
        return engine.Failure(
            error_type="SoftTimeout",
            message=str(error) or f"stopped at the soft timeout of {claim.soft_timeout_seconds}s",
            traceback=traceback_module.format_exc(),
            timed_out=True,
            names=(*names, "TimeoutError"),
        )
    return engine.Failure(
        error_type=type(error).__name__,
        message=str(error),
        traceback=traceback_module.format_exc(),
        names=names,
        retryable=not isinstance(error, registry.PermanentError),
    )


class OutputError(registry.PermanentError):
    pass


def _checked_output(output):
    try:
        encoded = json.dumps(output)
    except (TypeError, ValueError) as error:
        raise OutputError(f"the node's return value is not JSON-serialisable: {error}") from None
    limit = settings.KEEL_MAX_OUTPUT_BYTES
    if len(encoded) > limit:
        raise OutputError(
            f"the node's output is {len(encoded)} bytes, over KEEL_MAX_OUTPUT_BYTES={limit}; "
            "return a reference (a path, a table name) instead of the data"
        )
    return output


def _cancel_hard_timeout() -> None:
    # RQ's hard timeout is a SIGALRM around the whole job; once the node has returned,
    # reporting its outcome must not be cut short by it.
    if threading.current_thread() is threading.main_thread():
        signal.alarm(0)


def _worker_name() -> str:
    job = get_current_job()
    name = getattr(job, "worker_name", None) if job is not None else None
    return name or os.environ.get("RQ_WORKER_ID") or f"pid-{os.getpid()}"
