"""The RQ entry point: run one attempt of one node-run, and commit its outcome.

The job is a thin wrapper (claim, run, report): every state change is the engine's. It
runs in the process that runs the node — a forking worker's work horse, or a simple
worker itself — and that process commits the outcome to the database before it ends.
Nothing about an outcome travels through Redis: RQ keeps only a small summary.
"""

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback as traceback_module
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.db import connections as db_connections
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from workflows import engine
from workflows.definitions import registry
from workflows.runtime import heartbeat, outages
from workflows.runtime.context import NodeContext

logger = logging.getLogger(__name__)


class StoppedFromOutside(BaseException):
    """Raised in a node whose horse got SIGTERM that Keel's worker did not send: its worker
    died and the horse was cleaned up, or the machine is shutting down."""


class HardTimeout(BaseException):
    """Raised in a forking worker's horse when the worker asks its node to stop at the hard
    timeout (SIGTERM). A BaseException, so that a node's ``except Exception`` lets it pass."""


class Phase:
    """Where the process running a node is, for the forking worker that watches it.

    The worker keeps one shared page (``workflows.runtime.worker.SharedPhase``); elsewhere (a
    simple worker, a test) this plain object stands in. ``stop_reason`` is what the
    watcher asks for when it sends SIGTERM.
    """

    CLAIMING, RUNNING, REPORTING, DONE = 0, 1, 2, 3
    TIMEOUT, SUPERSEDED = 1, 2

    def __init__(self):
        self.value = self.CLAIMING
        self.stop_reason = 0

    def set(self, value: int) -> None:
        self.value = value


# Replaced by a page shared with the worker in a forking worker's horse.
phase: Phase = Phase()


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as the process that ran the node saw it."""

    output: Any = None
    failure: engine.Failure | None = None
    superseded: bool = False

    def summary(self) -> dict:
        """What RQ keeps as the job's result: small, and never the outcome itself."""
        if self.superseded:
            return {"superseded": True}
        if self.failure:
            return {"failed": self.failure.error_type}
        return {"succeeded": True}


def run_attempt(node_run_id: int, attempt: int) -> dict:
    """The RQ job: claim the attempt, run the node with a heartbeat beside it, commit.

    1. Claim: compare-and-set queued → running for this attempt; a stale message
       (already claimed, cancelled, superseded) returns without running anything.
    2. Have the process's heartbeat watch the attempt; run the node function with ``ctx``.
    3. Commit the outcome — success (output) or failure (error, traceback; timed out at
       the hard or soft timeout) — to the engine, which decides what comes next. While
       the database is unreachable, claim and report are retried with backoff
       (KEEL_REPORT_RETRY_SECONDS): a finished node is never run again for an outage.
    """
    started = time.monotonic()
    actor = _worker_name()
    phase.set(Phase.CLAIMING)
    check_connections()
    claim, _ = outages.retry(
        lambda: engine.claim_attempt(
            node_run_id, attempt, worker=actor, pid=os.getpid(), host=socket.gethostname()
        ),
        what=f"claim node-run {node_run_id} attempt {attempt}",
    )
    if claim is None:
        phase.set(Phase.DONE)
        return {"stale": True}
    outcome = run_claimed(claim, started)
    phase.set(Phase.REPORTING)
    _, waited = outages.retry(
        lambda: report(claim, outcome, actor=actor),
        what=f"report node-run {node_run_id} attempt {attempt}",
    )
    if waited:
        note = f"the outcome of attempt {attempt} {waited}; committed once the database answered"
        outages.retry(
            lambda: engine.note_attempt(node_run_id, attempt, note, actor=actor),
            what=f"note the delayed report of node-run {node_run_id} attempt {attempt}",
        )
    phase.set(Phase.DONE)
    return outcome.summary()


CONNECTION_CHECK_SECONDS = 1.0
_connections_checked_at = float("-inf")


def check_connections() -> None:
    """A worker lives for days: drop connections the database has closed meanwhile, or
    that outlived KEEL_DB_CONN_MAX_AGE.

    After an error at once, otherwise at most every CONNECTION_CHECK_SECONDS: on
    PostgreSQL a check costs a round trip (CONN_HEALTH_CHECKS).
    """
    global _connections_checked_at
    now = time.monotonic()
    errors = any(db.errors_occurred for db in db_connections.all(initialized_only=True))
    if errors or now - _connections_checked_at >= CONNECTION_CHECK_SECONDS:
        close_old_connections()
        _connections_checked_at = now


def run_claimed(claim: engine.Claim, started: float) -> Outcome:
    """Run a claimed node with its heartbeat; never raises for what the node does."""
    ctx = NodeContext(claim, started_monotonic=started)
    beside = heartbeat.for_this_process()
    beside.watch(ctx, claim.node_run_id, claim.attempt)
    try:
        phase.set(Phase.RUNNING)
        try:
            output = registry.get(claim.node_type)(ctx)
        finally:
            phase.set(Phase.REPORTING)  # from here on, a stop request waits for the report
            _cancel_hard_timeout()
        outcome = Outcome(output=_checked_output(output))
    except engine.AttemptSuperseded:
        logger.info(
            "Node-run %s attempt %s stopped: no longer current.", claim.node_run_id, claim.attempt
        )
        outcome = Outcome(superseded=True)
    except HardTimeout:
        outcome = Outcome(failure=timeout_failure(claim.timeout_seconds, stopped=True))
    except StoppedFromOutside:
        outcome = Outcome(failure=stopped_from_outside(time.monotonic() - started))
    except JobTimeoutException:
        # A simple worker's hard timeout: RQ's alarm interrupted the node.
        outcome = Outcome(failure=timeout_failure(claim.timeout_seconds, stopped=True))
    except Exception as error:
        outcome = Outcome(failure=_failure_from(error, claim))
    finally:
        beside.unwatch()
    try:
        ctx.flush_logs(final=True)
    except DatabaseError:
        logger.exception("Could not store the last log lines of node-run %s", claim.node_run_id)
    return outcome


def report(claim: engine.Claim, outcome: Outcome, *, actor: str) -> None:
    """Commit an outcome through the engine (a superseded attempt has nothing to report)."""
    if outcome.superseded:
        return
    if outcome.failure:
        engine.fail_attempt(
            claim.node_run_id, claim.attempt, outcome.failure, actor=actor, run_id=claim.run_id
        )
        return
    engine.complete_attempt(
        claim.node_run_id, claim.attempt, outcome.output, actor=actor, run_id=claim.run_id
    )


def timeout_failure(timeout: int, *, stopped: bool, grace: int = 0) -> engine.Failure:
    """A timed-out attempt, saying whether the node stopped when asked or was killed."""
    message = (
        f"stopped at its {timeout} s timeout (asked to stop, and it did)"
        if stopped
        else f"killed {grace} s after its {timeout} s timeout: it ignored the stop request"
    )
    return engine.Failure(
        error_type="HardTimeout",
        message=message,
        traceback="" if not stopped else traceback_module.format_exc(limit=20),
        timed_out=True,
        names=("HardTimeout", "TimeoutError"),
    )


def stopped_from_outside(seconds: float) -> engine.Failure:
    """An attempt stopped by a SIGTERM Keel did not send: not a timeout, and not the node's
    fault, so it is retried whatever its retry_on says (as a lost worker's attempt is)."""
    return engine.Failure(
        error_type="StoppedFromOutside",
        message=(
            f"the process running the node was told to stop (SIGTERM) after {seconds:.0f} s, "
            "not by Keel: its worker died, or the machine or service is shutting down"
        ),
        traceback=traceback_module.format_exc(limit=20),
        names=("StoppedFromOutside",),
        ignore_retry_on=True,
    )


def ended_without_report(description: str) -> engine.Failure:
    """An attempt whose process ended (killed, crashed) without committing an outcome."""
    return engine.Failure(
        error_type="WorkHorseEnded",
        message=f"the process running the node ended without reporting: {description}",
        names=("WorkHorseEnded",),
        ignore_retry_on=True,
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
    if isinstance(error, outages.OUTAGE_ERRORS):
        # The database went away under the node (a restart, a failover): not the node's
        # fault, so retried whatever ``retry_on`` lists; the next attempt resumes from
        # its last checkpoint.
        return engine.Failure(
            error_type=type(error).__name__,
            message=f"the database connection was lost while the node ran: {error}",
            traceback=traceback_module.format_exc(),
            names=names,
            ignore_retry_on=True,
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
    # A simple worker's hard timeout is a SIGALRM around the whole job; once the node has
    # returned, committing its outcome must not be cut short by it.
    if threading.current_thread() is threading.main_thread():
        signal.alarm(0)


def _worker_name() -> str:
    job = get_current_job()
    name = getattr(job, "worker_name", None) if job is not None else None
    return name or os.environ.get("RQ_WORKER_ID") or f"pid-{os.getpid()}"
