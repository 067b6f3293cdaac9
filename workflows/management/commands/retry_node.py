from workflows import operations
from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    help = "Give one node a new attempt (ending a stuck one); --downstream also resets the nodes after it."
    action = "retry"

    def add_action_arguments(self, parser):
        parser.add_argument("node_key")
        parser.add_argument(
            "--downstream", action="store_true", help="Also reset every node downstream of it."
        )

    def action_options(self, options):
        return {"node": options["node_key"], "downstream": options["downstream"]}

    def perform(self, run_id, actor, reason, options):
        return operations.retry_node(
            run_id,
            options["node_key"],
            actor=actor,
            reason=reason,
            downstream=options["downstream"],
        )
