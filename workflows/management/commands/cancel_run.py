from workflows import operations
from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    help = "Cancel a run: queued nodes are dropped, running ones stopped."
    action = "cancel"

    def perform(self, run_id, actor, reason, options):
        return operations.cancel_run(run_id, actor=actor, reason=reason)
