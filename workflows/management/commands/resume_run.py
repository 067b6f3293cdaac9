from workflows import operations
from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    help = "Resume a failed or cancelled run: succeeded nodes are kept, the rest run again from their checkpoints."
    action = "resume"

    def perform(self, run_id, actor, reason, options):
        return operations.resume_run(run_id, actor=actor, reason=reason)
