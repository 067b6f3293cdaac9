"""A node type for the log tail's browser test: it logs one line at a time, each when the
test says so (a file appears), so the test waits on events, not on the clock. Loaded by
the test process on import and by workers through KEEL_NODE_MODULES."""

import logging
import time
from pathlib import Path

from workflows.definitions.registry import node_type


def _wait_for(path: Path, ctx) -> bool:
    """Until ``path`` exists (True), or the node is asked to stop (False)."""
    while not path.exists():
        if ctx.should_stop():
            return False
        time.sleep(0.05)
    return True


@node_type("browser.log_when_told", params={"gate": str, "lines": int})
def log_when_told(ctx):
    """Line 1 at once; line N once the file go-N is in the gate directory; the last line
    is an ERROR. Returns once the file ``finish`` is there."""
    gate, lines = Path(ctx.params["gate"]), ctx.params["lines"]
    for number in range(1, lines + 1):
        if number > 1 and not _wait_for(gate / f"go-{number}", ctx):
            return {"stopped_at": number}
        if number == lines:
            ctx.log.error("line %s: could not parse row 7 of orders.csv", number)
        else:
            ctx.log.log(logging.INFO, "line %s: working", number)
    _wait_for(gate / "finish", ctx)
    return {"lines": lines}
