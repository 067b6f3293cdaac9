"""Compensate hooks: the user code a rollback runs to undo what a node did.

They run before the rollback takes any lock and outside any transaction, each in a
thread of its own within ``KEEL_COMPENSATE_TIMEOUT_SECONDS`` (docs/architecture.md,
"Engine").
"""

import logging
import threading
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, connections
from django.db.transaction import TransactionManagementError

from workflows.definitions import registry
from workflows.engine.plans import Plan, RecoveryError
from workflows.models import NodeRun, Run


@dataclass
class CompensationContext:
    """What a compensate hook sees: ``hook(ctx, output)``."""

    run_id: int
    node_key: str
    params: dict
    run_params: dict
    idempotency_key: str
    log: logging.Logger


def compensate(plan: Plan) -> None:
    """Run the plan's compensate hooks, newest completion first; the first that fails
    or overruns raises ``RecoveryError`` naming its node, and the rest do not run."""
    if plan.compensate and connection.in_atomic_block:
        raise TransactionManagementError(
            "Compensate hooks run outside any transaction: call the rollback outside "
            "transaction.atomic() (a hook's thread could neither see nor wait for its rows)."
        )
    done: list[str] = []
    for key in plan.compensate:
        _compensate(plan.run, plan.nodes[key], settings.KEEL_COMPENSATE_TIMEOUT_SECONDS, done)
        done.append(key)


def _compensate(run: Run, node: NodeRun, timeout: float, done: list[str]) -> None:
    hook = registry.get(node.node_type).compensate_func
    ctx = CompensationContext(
        run_id=run.pk,
        node_key=node.node_key,
        params=node.params,
        run_params=run.params,
        idempotency_key=node.idempotency_key,
        log=logging.getLogger(f"keel.compensate.{node.node_key}"),
    )
    failed: list[BaseException] = []

    def call() -> None:
        try:
            hook(ctx, node.output)
        except Exception as error:
            failed.append(error)
        finally:
            connections.close_all()  # this thread's own connections

    # A thread, so that the timeout holds whatever the hook does; one that overruns is
    # left to finish on its own (a daemon: it never keeps the process alive).
    thread = threading.Thread(target=call, name=f"keel-compensate-{node.node_key}", daemon=True)
    thread.start()
    thread.join(timeout)
    earlier = f" (already compensated: {', '.join(done)})" if done else ""
    if thread.is_alive():
        raise RecoveryError(
            f"The compensate hook of node {node.node_key} did not finish within {timeout:g}s "
            f"(KEEL_COMPENSATE_TIMEOUT_SECONDS){earlier}. Nothing was reset; it may still "
            "finish on its own. Check what it does, then roll back again (hooks must be safe "
            "to repeat)."
        )
    if failed:
        error = failed[0]
        raise RecoveryError(
            f"The compensate hook of node {node.node_key} failed: {type(error).__name__}: "
            f"{error}{earlier}. Nothing was reset; fix the cause and roll back again (hooks "
            "must be safe to repeat)."
        ) from error
