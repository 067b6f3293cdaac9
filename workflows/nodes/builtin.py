"""Built-in node types, useful in any workflow (and in benchmarks)."""

import time

from workflows.definitions.registry import Param, SoftTimeout, node_type


@node_type("keel.noop", description="Does nothing; passes its upstream outputs' keys on.")
def noop(ctx):
    return {}


@node_type(
    "keel.sleep",
    params={"seconds": Param(float, default=1.0)},
    description="Sleeps, one second at a time, honouring the soft timeout.",
)
def sleep(ctx):
    slept = (ctx.checkpoint_state or {}).get("slept", 0.0)
    while slept < ctx.params["seconds"]:
        if ctx.should_stop():
            ctx.checkpoint({"slept": slept})
            raise SoftTimeout(f"stopped after {slept:.0f}s of {ctx.params['seconds']:.0f}s")
        step = min(1.0, ctx.params["seconds"] - slept)
        time.sleep(step)
        slept += step
        ctx.progress(slept, ctx.params["seconds"])
    return {"slept": slept}
