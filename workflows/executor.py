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

from django.conf import settings
from django.db import close_old_connections
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from workflows import engine, registry
from workflows.context import NodeContext
from workflows.heartbeat import Heartbeat

logger = logging.getLogger(__name__)


def run_attempt(node_run_id: int, attempt: int) -> dict:
    """Claim the attempt, run the node with a heartbeat beside it, report the outcome.

    1. Claim: compare-and-set queued → running for this attempt; a stale message
       (already claimed, cancelled, superseded) returns without running anything.
    2. Start the heartbeat thread and run the node function with its ``ctx``.
    3. Report success (output) or failure (error, traceback; timed out on RQ's hard
       timeout or the node's SoftTimeout) to the engine, which decides what is next.
    """
    started = time.monotonic()
    # A worker lives for days: drop a connection the database has closed meanwhile.
    close_old_connections()
    claim = engine.claim_attempt(
        node_run_id, attempt, worker=_worker_name(), pid=os.getpid(), host=socket.gethostname()
    )
    if claim is None:
        return {"stale": True}
    ctx = NodeContext(claim, started_monotonic=started)
    heartbeat = Heartbeat(ctx, node_run_id, attempt)
    heartbeat.start()
    try:
        output = registry.get(claim.node_type)(ctx)
        _cancel_hard_timeout()
        output = _checked_output(output)
    except engine.AttemptSuperseded:
        _cancel_hard_timeout()
        logger.info("Node-run %s attempt %s stopped: no longer current.", node_run_id, attempt)
        return {"superseded": True}
    except JobTimeoutException as error:
        failure = engine.Failure(
            error_type="HardTimeout",
            message=f"killed after the hard timeout of {claim.timeout_seconds}s ({error})",
            traceback=traceback_module.format_exc(),
            timed_out=True,
            names=("HardTimeout", "TimeoutError"),
        )
        return _report_failure(ctx, heartbeat, claim, failure)
    except Exception as error:
        _cancel_hard_timeout()
        return _report_failure(ctx, heartbeat, claim, _failure_from(error, claim))
    finally:
        heartbeat.stop()
    ctx.flush_logs(final=True)
    engine.complete_attempt(
        node_run_id,
        attempt,
        output,
        actor=_worker_name(),
        run_id=claim.run_id,
        next_sequence=ctx.known_next_sequence(),
    )
    return {"succeeded": True}


def _report_failure(ctx, heartbeat, claim, failure: engine.Failure) -> dict:
    heartbeat.stop()
    ctx.flush_logs(final=True)
    engine.fail_attempt(
        claim.node_run_id, claim.attempt, failure, actor=_worker_name(), run_id=claim.run_id
    )
    return {"failed": failure.error_type}


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
