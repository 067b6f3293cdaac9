"""Node types used by the tests. Workers import them through KEEL_NODE_MODULES."""

import os
import signal
import time

from django.db import transaction

from tests.testapp.models import Execution, SinkRow
from workflows.definitions.registry import Param, PermanentError, SoftTimeout, node_type


def _record(ctx):
    Execution.objects.create(
        node_key=ctx.node_key, run_id=ctx.run_id, attempt=ctx.attempt, pid=os.getpid()
    )


@node_type(
    "test.record", params={"value": Param(int, default=0), "sleep": Param(float, default=0.0)}
)
def record(ctx):
    """Records that it ran; returns its value plus the sum of its inputs' totals."""
    _record(ctx)
    if ctx.params["sleep"]:
        time.sleep(ctx.params["sleep"])
    upstream_total = sum(output.get("total", 0) for output in ctx.inputs.values())
    return {"total": ctx.params["value"] + upstream_total, "seen": sorted(ctx.inputs)}


@node_type(
    "test.fail_until", params={"succeed_on": int, "error": Param(str, default="ConnectionError")}
)
def fail_until(ctx):
    """Fails (with the named error) until attempt ``succeed_on``."""
    _record(ctx)
    if ctx.attempt < ctx.params["succeed_on"]:
        errors = {
            "ConnectionError": ConnectionError,
            "ValueError": ValueError,
            "PermanentError": PermanentError,
        }
        raise errors[ctx.params["error"]](f"planned failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@node_type("test.sleep_first", params={"seconds": float, "until_attempt": Param(int, default=2)})
def sleep_first(ctx):
    """Sleeps (ignoring should_stop) on early attempts: a node only a hard timeout ends."""
    _record(ctx)
    if ctx.attempt < ctx.params["until_attempt"]:
        time.sleep(ctx.params["seconds"])
    return {"attempt": ctx.attempt}


@node_type("test.hang_masked", params={"seconds": float, "until_attempt": Param(int, default=2)})
def hang_masked(ctx):
    """On early attempts, hangs with the stop signals blocked, as a node stuck in C code
    that never returns to Python: only a kill ends it."""
    _record(ctx)
    if ctx.attempt < ctx.params["until_attempt"]:
        stops = {signal.SIGTERM, signal.SIGINT, signal.SIGALRM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            time.sleep(ctx.params["seconds"])
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    return {"attempt": ctx.attempt}


@node_type("test.huge_error", params={"megabytes": Param(int, default=10)})
def huge_error(ctx):
    """Fails with an error message of many megabytes."""
    raise PermanentError("x" * (ctx.params["megabytes"] * 1024 * 1024))


@node_type("test.loses_database")
def loses_database(ctx):
    """On attempt 1, fails as a node does when the database restarts under it."""
    from django.db import OperationalError

    _record(ctx)
    if ctx.attempt == 1:
        raise OperationalError("terminating connection due to administrator command")
    return {"attempt": ctx.attempt}


@node_type(
    "test.batches",
    params={"rows": int, "batch": int, "pause": Param(float, default=0.0)},
    side_effects=True,
)
def batches(ctx):
    """Writes rows in batches; each batch and its checkpoint commit together."""
    _record(ctx)
    state = ctx.checkpoint_state or {"next": 1}
    first = state["next"]
    while state["next"] <= ctx.params["rows"]:
        end = min(state["next"] + ctx.params["batch"], ctx.params["rows"] + 1)
        with transaction.atomic():
            SinkRow.objects.bulk_create(
                [
                    SinkRow(run_key=ctx.idempotency_key, row_id=i, attempt=ctx.attempt)
                    for i in range(state["next"], end)
                ]
            )
            state = {"next": end}
            ctx.checkpoint(state)
        ctx.progress(end - 1, ctx.params["rows"])
        if ctx.params["pause"]:
            time.sleep(ctx.params["pause"])
        if state["next"] <= ctx.params["rows"] and ctx.should_stop():
            raise SoftTimeout(f"stopped before row {state['next']}")
    return {"rows": ctx.params["rows"], "started_at_row": first}


@node_type("test.cooperative_sleep", params={"seconds": float})
def cooperative_sleep(ctx):
    """Sleeps in small steps and stops as soon as should_stop() says so."""
    _record(ctx)
    deadline = time.monotonic() + ctx.params["seconds"]
    while time.monotonic() < deadline:
        if ctx.should_stop():
            raise SoftTimeout("asked to stop")
        time.sleep(0.05)
    return {"slept": ctx.params["seconds"]}


@node_type("test.log_lines", params={"lines": int})
def log_lines(ctx):
    for number in range(ctx.params["lines"]):
        ctx.log.info("line %d", number)
    return {"logged": ctx.params["lines"]}


@node_type("test.effect", params={"value": Param(int, default=0)}, side_effects=True)
def effect(ctx):
    """A node with an external effect and a compensate hook that undoes it."""
    _record(ctx)
    return {"value": ctx.params["value"]}


@effect.compensate
def undo_effect(ctx, output):
    Execution.objects.create(
        node_key=f"undo:{ctx.node_key}", run_id=ctx.run_id, attempt=0, pid=os.getpid()
    )


@node_type("test.busy", params={"seconds": float})
def busy(ctx):
    """Uses ``seconds`` of CPU time: on a busy machine it takes longer, never less work."""
    deadline = time.thread_time() + ctx.params["seconds"]
    spins = 0
    while time.thread_time() < deadline:
        spins += sum(range(1000))
    return {"spins": spins, "cpu_seconds": time.thread_time()}


@node_type("test.undoable", params={"undo": Param(str, default="record")}, side_effects=True)
def undoable(ctx):
    """A node whose compensate hook does what ``undo`` says: record, fail, hang or
    change the run while it runs."""
    _record(ctx)
    return {"done": True}


@undoable.compensate
def undo_undoable(ctx, output):
    from workflows.models import NodeRun, Run

    how = ctx.params["undo"]
    if how == "fail":
        raise RuntimeError("the warehouse refused the delete")
    if how == "hang":  # past the test's 1 s timeout, then gone without a trace
        time.sleep(3)
        return
    if how == "change":  # another operator acts on the run meanwhile
        NodeRun.objects.filter(run_id=ctx.run_id, node_key="second").update(status="failed")
    # The hook runs outside the operator's transaction: the run's row is not locked.
    with transaction.atomic():
        free = Run.objects.select_for_update(nowait=True).filter(pk=ctx.run_id).exists()
    Execution.objects.create(
        node_key=f"undo:{ctx.node_key}:{'unlocked' if free else 'locked'}",
        run_id=ctx.run_id,
        attempt=0,
        pid=os.getpid(),
    )


@node_type("test.undo_probe", side_effects=True)
def undo_probe(ctx):
    """A node whose compensate hook records whether it ran inside a transaction."""
    return {"done": True}


@undo_probe.compensate
def undo_probe_hook(ctx, output):
    from django.db import connection

    Execution.objects.create(
        node_key=f"undo:{ctx.node_key}:in_atomic_block={connection.in_atomic_block}",
        run_id=ctx.run_id,
        attempt=0,
        pid=os.getpid(),
    )
