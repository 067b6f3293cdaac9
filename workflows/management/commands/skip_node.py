from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    action = "skip"

    def add_action_arguments(self, parser):
        parser.add_argument("node_key")

    def action_options(self, options):
        return {"node": options["node_key"]}
