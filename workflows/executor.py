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


# By (node-run, attempt): the claims a Keel worker's companion made (workflows/
# companion.py) for the jobs it runs, sent before RQ's bookkeeping for the job. A forking
# worker reads the answer before it forks: the horse inherits the claim, read.
worker_claims: dict[tuple[int, int], "CompanionClaim"] = {}
# A simple worker's jobs that were started (None) or ran (their outcome), by the same
# key: the worker reports them once RQ is done with the job (finish_job).
ran_outcomes: dict[tuple[int, int], "Outcome | None"] = {}


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
       A Keel worker's companion has made the claim already, while RQ did its own
       bookkeeping for the job in Redis (``worker_claims``).
    2. Have the process's heartbeat watch the attempt; run the node function with ``ctx``.
    3. Report success (output) or failure (error, traceback; timed out on RQ's hard
       timeout or the node's SoftTimeout) to the engine, which decides what is next.
       In a Keel worker the outcome is the job's result instead, and the worker's
       companion reports it while the worker goes on to its next job (finish_job): a
       forking worker's horse never opens a connection for that.
    """
    started = time.monotonic()
    key = (node_run_id, attempt)
    made = worker_claims.get(key)
    if made is None:
        check_connections()
        claim = engine.claim_attempt(
            node_run_id, attempt, worker=_worker_name(), pid=os.getpid(), host=socket.gethostname()
        )
    else:
        ran_outcomes[key] = None
        claim = made.claim()
    if claim is None:
        return {"stale": True}
    outcome = run_claimed(claim, started)
    if made is not None:
        ran_outcomes[key] = outcome
        return {"outcome": outcome.as_json()}
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
    """Report an outcome to the engine (a superseded attempt has nothing to report)."""
    if outcome.superseded:
        return
    if outcome.failure:
        engine.fail_attempt(
            claim.node_run_id, claim.attempt, outcome.failure, actor=actor, run_id=claim.run_id
        )
        return
    engine.complete_attempt(
        claim.node_run_id, claim.attempt, outcome.output, actor=actor, facts=claim.facts
    )


# --- The Keel worker's side (workflows/worker.py) ----------------------------------------------


def send_claim(job, *, worker: str, host: str, companion: "Companion") -> tuple[int, int] | None:
    """In a Keel worker, before RQ's bookkeeping for a job: have the companion claim the
    attempt it carries, and return without waiting for the answer.

    Returns the (node-run, attempt) key, or None for a job that is not Keel's or a claim
    that could not be sent (the job then claims for itself and meets the same error,
    which RQ records).
    """
    if job.func_name != dispatch.EXECUTOR_FUNC or len(job.args) != 2:
        return None
    key = (int(job.args[0]), int(job.args[1]))
    try:
        worker_claims[key] = companion.send_claim(*key, worker=worker, pid=os.getpid(), host=host)
    except DatabaseError:
        logger.exception("Could not claim node-run %s attempt %s", *key)
        return None
    return key


def receive_claim(key: tuple[int, int]) -> None:
    """Read the answer to a claim sent by ``send_claim``: a forking worker does before it
    forks, so that the horse inherits the claim itself. On an error the claim is
    forgotten and the horse claims for itself."""
    made = worker_claims.get(key)
    if made is None:
        return
    try:
        made.claim()
    except DatabaseError:
        logger.exception("Could not claim node-run %s attempt %s before forking", *key)
        del worker_claims[key]


def record_work_horse(key: tuple[int, int], pid: int, companion: "Companion") -> None:
    """The horse's pid on the attempt: diagnostics look at the process that runs the node."""
    made = worker_claims.get(key)
    if made is not None and made.claim() is not None:
        try:
            companion.note_pid(*key, pid)
        except DatabaseError:
            logger.exception("Could not note the work horse of node-run %s attempt %s", *key)


def finish_job(
    job, key: tuple[int, int], *, worker: str, companion: "Companion", forked: bool
) -> None:
    """Once RQ is done with a job whose attempt the worker's companion claimed: have the
    companion report its outcome (``report_ended_job``) while the worker goes on.

    A simple worker hands over the outcome the job left in ``ran_outcomes``, or, if RQ
    never called the job (it failed before), a failure saying so. A forking worker's
    horse returned its outcome as the job's result, which the companion reads.
    """
    made = worker_claims.pop(key, None)
    started = key in ran_outcomes
    outcome = ran_outcomes.pop(key, None)
    if made is None:
        return
    try:
        claim = made.claim()
        if claim is None:
            return
        if outcome is None and not forked and not started:
            outcome = Outcome(failure=_not_started_failure())
        companion.report(claim, actor=worker, outcome=outcome, job_id=job.id)
    except DatabaseError:
        # The attempt stays running; the watchdog finds the job ended without a report.
        logger.exception("Could not report node-run %s attempt %s", *key)


def report_ended_job(
    claim: engine.Claim, *, actor: str, outcome: Outcome | None, job_id: str
) -> None:
    """Report an ended job's ``outcome`` or, when there is none, the one it returned as
    its result; when it returned none (a horse killed at the hard timeout, stopped,
    crashed), a failure saying so, unless the attempt has ended meanwhile (stopped by
    the engine)."""
    if outcome is None:
        job = Job(id=job_id, connection=dispatch.redis_connection(), serializer=JSONSerializer)
        result = job.latest_result()
        returned = result.return_value if result is not None else None
        if isinstance(returned, dict) and returned.get("outcome"):
            outcome = Outcome.from_json(returned["outcome"])
        elif engine.attempt_is_running(claim.node_run_id, claim.attempt):
            outcome = Outcome(failure=_horse_failure(claim, result))
        else:
            return
    report(claim, outcome, actor=actor)


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
