from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
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
