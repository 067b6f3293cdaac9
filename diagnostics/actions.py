"""The queue actions, in the registry of operator actions (workflows/actions.py).

Registered when the diagnostics app is ready; workflows never imports this app.
"""

from diagnostics import operations
from workflows.actions import Action, register


def _queue_action(operation):
    def perform(queue, *, actor, reason, request_key=None):
        # A queue action is idempotent by nature (a second clear finds nothing to clear).
        return operation(queue, actor=actor, reason=reason)

    return perform


register(
    Action(
        "clear_queue",
        "Clear queue",
        "queue",
        "Remove every job waiting in the queue. Running and finished jobs are untouched; nodes "
        "still queued in the database are re-sent by the watchdog within seconds.",
        permission=operations.PERMISSION,
        perform=_queue_action(operations.clear_queue),
        danger=True,
    )
)
register(
    Action(
        "requeue_failed",
        "Requeue failed jobs",
        "queue",
        "Put the queue's failed jobs back on it; a requeued Keel job runs only if its attempt "
        "is still the node's current one.",
        permission=operations.PERMISSION,
        perform=_queue_action(operations.requeue_failed),
    )
)
