from workflows import operations
from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    help = (
        "Roll a finished run back to a checkpoint or to just before a node: compensate what completed "
        "after it, reset those nodes and their downstream, then resume (unless --no-resume)."
    )
    action = "rollback"

    def add_action_arguments(self, parser):
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument(
            "--to-checkpoint", type=int, metavar="ID", help="A checkpoint id (see show_run --json)."
        )
        target.add_argument("--to-node", metavar="KEY", help="Roll back to just before this node.")
        parser.add_argument(
            "--no-resume", action="store_true", help="Leave the run cancelled after rolling back."
        )

    def action_options(self, options):
        return {
            "to_checkpoint": options["to_checkpoint"],
            "to_node": options["to_node"],
            "resume": not options["no_resume"],
        }

    def perform(self, run_id, actor, reason, options):
        return operations.rollback_run(
            run_id, actor=actor, reason=reason, **self.action_options(options)
        )
