from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    action = "retry"

    def add_action_arguments(self, parser):
        parser.add_argument("node_key")
        parser.add_argument(
            "--downstream", action="store_true", help="Also reset every node downstream of it."
        )

    def action_options(self, options):
        return {"node": options["node_key"], "downstream": options["downstream"]}
