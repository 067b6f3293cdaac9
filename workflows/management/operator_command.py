"""The shape shared by operator commands: --reason, --dry-run (prints the preview), audit.

The action itself (its description, preview and operation) comes from the registry.
"""

import getpass

from django.core.management.base import BaseCommand, CommandError

from workflows import actions, operations


class OperatorCommand(BaseCommand):
    """Subclasses name the action and map options to it; this class does the rest."""

    action = ""

    @property
    def help(self) -> str:
        return actions.get(self.action).description

    def add_arguments(self, parser):
        parser.add_argument("run_id")
        parser.add_argument("--reason", required=True, help="Why (kept in the run's history).")
        parser.add_argument(
            "--dry-run", action="store_true", help="Print what would happen and change nothing."
        )
        self.add_action_arguments(parser)

    def add_action_arguments(self, parser):
        pass

    def action_options(self, options) -> dict:
        """Options for both the preview and the operation."""
        return {}

    def perform(self, run_id, actor, reason, options) -> operations.Outcome:
        return actions.get(self.action).perform(
            run_id, actor=actor, reason=reason, **self.action_options(options)
        )

    def handle(self, *args, **options):
        actor = f"cli:{getpass.getuser()}"
        try:
            if options["dry_run"]:
                preview = actions.get(self.action).preview
                self.print_preview(preview(options["run_id"], **self.action_options(options)))
                return
            outcome = self.perform(options["run_id"], actor, options["reason"], options)
        except operations.OperationError as error:
            raise CommandError(str(error)) from None
        style = self.style.SUCCESS if outcome.changed else self.style.NOTICE
        self.stdout.write(style(outcome.message))

    def print_preview(self, preview: operations.Preview) -> None:
        self.stdout.write(
            f"{preview.action} run {preview.run_id} of {preview.workflow} v{preview.version} "
            f"(now {preview.run_status}) — dry run, nothing changed"
        )
        if preview.noop_message:
            self.stdout.write(self.style.NOTICE(preview.noop_message))
            return
        for node in preview.nodes:
            where = f"queue {node.queue}" + (f", pool {node.pool}" if node.pool else "")
            self.stdout.write(f"  {node.key:<24} {node.status:<11} {node.will} ({where})")
        for warning in preview.warnings:
            self.stdout.write(self.style.WARNING(f"  ! {warning}"))
