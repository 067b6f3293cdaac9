"""Node types for fault injection (bench/faults.py and tests/diagnostics).

Workers load them through KEEL_NODE_MODULES (add ``bench.fault_nodes``). ``faults.work``
and ``faults.hang`` append one line to ``<KEEL_FAULTS_RECORD_DIR>/<run>-<node>.done`` each
time their body runs to completion, so a body that completed twice shows as two lines.
"""

import os
import signal
import time
from pathlib import Path

from django.db import transaction

from workflows.definitions.registry import Param, SoftTimeout, node_type


@node_type(
    "faults.work",
    params={"steps": int, "step_seconds": Param(float, default=0.5)},
    description="Works in steps, checkpointing each; resumes after the last checkpoint.",
)
def work(ctx):
    state = ctx.checkpoint_state or {"next": 0}
    first = state["next"]
    while state["next"] < ctx.params["steps"]:
        time.sleep(ctx.params["step_seconds"])
        with transaction.atomic():
            state = {"next": state["next"] + 1}
            ctx.checkpoint(state)
        ctx.progress(state["next"], ctx.params["steps"])
    record_completion(ctx)
    return {"steps": ctx.params["steps"], "resumed_from": first}


# What a node stuck in C code looks like from Python: no handler of these runs.
HANG_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGALRM}


@node_type(
    "faults.hang",
    params={"seconds": Param(float, default=600.0)},
    description="Attempt 1 hangs with SIGTERM, SIGINT and SIGALRM blocked; later ones complete.",
)
def hang(ctx):
    """A node that ignores a stop request, as one stuck in a C call does.

    The signals are blocked in the node's (main) thread only. Threads started earlier
    (the heartbeat) may still take a pending SIGTERM, but Python runs signal handlers in
    the main thread alone, and that one sits in a single long sleep: only SIGKILL ends it.
    """
    if ctx.attempt == 1:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANG_SIGNALS)
        try:
            time.sleep(ctx.params["seconds"])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    record_completion(ctx)
    return {"attempt": ctx.attempt}


def record_completion(ctx) -> None:
    directory = os.environ.get("KEEL_FAULTS_RECORD_DIR")
    if not directory:
        return
    line = f"{ctx.attempt} {os.getpid()}\n".encode()
    path = Path(directory) / f"{ctx.run_id}-{ctx.node_key}.done"
    # O_APPEND with one short write: lines from two processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def completions(directory: Path, run_id: int, node_key: str) -> int:
    path = Path(directory) / f"{run_id}-{node_key}.done"
    return len(path.read_text().splitlines()) if path.exists() else 0


@node_type(
    "faults.stall",
    params={"seconds": float},
    description="Reports progress once, then sleeps (heartbeats continue): stalled, not dead.",
)
def stall(ctx):
    ctx.log.info("item 1 done")
    ctx.log.warning("waiting for the lock on item 2")
    ctx.progress(1, 10, "stuck on item 2")
    deadline = time.monotonic() + ctx.params["seconds"]
    while time.monotonic() < deadline:
        if ctx.should_stop():
            raise SoftTimeout("asked to stop")
        time.sleep(0.05)
    return {}


@node_type(
    "faults.pressure",
    params={"megabytes": int, "seconds": float},
    description="Holds memory and burns CPU for a while.",
)
def pressure(ctx):
    ballast = bytearray(ctx.params["megabytes"] * 2**20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1  # touch every page so it counts in RSS
    deadline = time.monotonic() + ctx.params["seconds"]
    spins = 0
    while time.monotonic() < deadline and not ctx.should_stop():
        spins += sum(range(2000))
    return {"megabytes": len(ballast) // 2**20}
