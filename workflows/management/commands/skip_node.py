from workflows import operations
from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    help = "Mark a node skipped so that its downstream may proceed."
    action = "skip"

    def add_action_arguments(self, parser):
        parser.add_argument("node_key")

    def action_options(self, options):
        return {"node": options["node_key"]}

    def perform(self, run_id, actor, reason, options):
        return operations.skip_node(run_id, options["node_key"], actor=actor, reason=reason)
