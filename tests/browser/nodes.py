"""Node types for the browser tests: they put whatever text they are given into logs,
outputs and error messages. Loaded by the test process on import and by workers
through KEEL_NODE_MODULES (see tests/browser/conftest.py)."""

from workflows.definitions.registry import PermanentError, node_type


@node_type("browser.echo", params={"text": str})
def echo(ctx):
    """Logs its text at several levels and returns it."""
    ctx.log.info("%s", ctx.params["text"])
    ctx.log.warning("warning: %s", ctx.params["text"])
    return {"echo": ctx.params["text"], ctx.params["text"][:40]: [ctx.params["text"]]}


@node_type("browser.fail_with", params={"text": str})
def fail_with(ctx):
    """Fails with its text as the error message."""
    ctx.log.error("%s", ctx.params["text"])
    raise PermanentError(ctx.params["text"])
