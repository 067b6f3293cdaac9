from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    action = "stop_node"

    def add_action_arguments(self, parser):
        parser.add_argument("node_key")
        parser.add_argument(
            "--expected-attempt",
            type=int,
            help="Refuse if the node has moved past this attempt (as `manage.py workers` shows).",
        )

    def action_options(self, options):
        return {"node": options["node_key"], "expected_attempt": options["expected_attempt"]}
