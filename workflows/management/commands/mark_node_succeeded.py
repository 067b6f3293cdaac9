import json

from django.core.management.base import CommandError

from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    action = "mark_succeeded"

    def add_action_arguments(self, parser):
        parser.add_argument("node_key")
        parser.add_argument(
            "--output",
            default="{}",
            metavar="JSON",
            help="The node's output, as JSON (default {}): downstream nodes receive it.",
        )

    def action_options(self, options):
        try:
            output = json.loads(options["output"])
        except json.JSONDecodeError as error:
            raise CommandError(f"--output is not valid JSON: {error}") from None
        return {"node": options["node_key"], "output": output}
