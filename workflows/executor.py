"""The RQ entry point: run one attempt of one node-run.

The job is a thin wrapper (claim, run, report): every state change is the engine's.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback as traceback_module
from dataclasses import asdict, dataclass
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from workflows import dispatch, engine, heartbeat, registry
from workflows.context import NodeContext

logger = logging.getLogger(__name__)


# Claims a forking worker made in its own process just before forking the work horse
# (workflows/worker.py), by (node-run, attempt); the horse inherits them. None: the
# message was stale.
claimed_before_fork: dict[tuple[int, int], engine.Claim | None] = {}


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
       A forking worker has claimed it already, in its own long-lived process with a
       warm database connection (claim_before_fork).
    2. Have the process's heartbeat watch the attempt; run the node function with ``ctx``.
    3. Report success (output) or failure (error, traceback; timed out on RQ's hard
       timeout or the node's SoftTimeout) to the engine, which decides what is next.
       In a forking worker's horse the outcome is the job's result instead, and the
       worker reports it (report_after_horse): most horses never open a connection.
    """
    started = time.monotonic()
    key = (node_run_id, attempt)
    if key in claimed_before_fork:
        claim = claimed_before_fork.pop(key)
        if claim is None:
            return {"stale": True}
        return {"outcome": run_claimed(claim, started).as_json()}
    check_connections()
    claim = engine.claim_attempt(
        node_run_id, attempt, worker=_worker_name(), pid=os.getpid(), host=socket.gethostname()
    )
    if claim is None:
        return {"stale": True}
    outcome = run_claimed(claim, started)
    report(claim, outcome, actor=_worker_name())
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
    if outcome.superseded:
        return
    if outcome.failure:
        engine.fail_attempt(
            claim.node_run_id, claim.attempt, outcome.failure, actor=actor, run_id=claim.run_id
        )
    else:
        engine.complete_attempt(
            claim.node_run_id, claim.attempt, outcome.output, actor=actor, facts=claim.facts
        )


# --- The forking worker's side (workflows/worker.py) ------------------------------------------


def claim_before_fork(job, *, worker: str, host: str) -> tuple[int, int] | None:
    """In a forking worker, before it forks: claim the attempt a Keel job carries.

    Returns the (node-run, attempt) key to report on after the horse ends, or None for
    a job that is not Keel's or a claim that could not be made (the horse then claims
    for itself and meets the same error, which RQ records).
    """
    if job.func_name != dispatch.EXECUTOR_FUNC or len(job.args) != 2:
        return None
    key = (int(job.args[0]), int(job.args[1]))
    try:
        check_connections()
        claimed_before_fork[key] = engine.claim_attempt(
            *key, worker=worker, pid=os.getpid(), host=host
        )
    except DatabaseError:
        logger.exception("Could not claim node-run %s attempt %s before forking", *key)
        return None
    return key


def record_work_horse(key: tuple[int, int], pid: int) -> None:
    """The horse's pid on the attempt: diagnostics look at the process that runs the node."""
    if claimed_before_fork.get(key) is not None:
        with contextlib.suppress(DatabaseError):
            engine.record_attempt_pid(*key, pid)


def report_after_horse(job, key: tuple[int, int], *, worker: str) -> None:
    """After the horse has ended: report the outcome it returned, or, when it returned
    none (killed at the hard timeout, stopped, crashed), a failure saying so."""
    claim = claimed_before_fork.pop(key, None)
    if claim is None:
        return
    try:
        result = job.latest_result()
        returned = result.return_value if result is not None else None
        if isinstance(returned, dict) and returned.get("outcome"):
            report(claim, Outcome.from_json(returned["outcome"]), actor=worker)
        elif engine.attempt_is_running(*key):
            report(claim, Outcome(failure=_horse_failure(claim, result)), actor=worker)
    except (DatabaseError, redis.RedisError):
        # The attempt stays running; the watchdog finds the job ended without a report.
        logger.exception("Could not report node-run %s attempt %s", *key)


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
