"""The base of the commands that act on one deployment (promote, abort)."""

import getpass

from django.core.management.base import BaseCommand, CommandError

from workflows.deployments import services
from workflows.operations import OperationError


class DeploymentActionCommand(BaseCommand):
    action = ""  # the name of the function in workflows.deployments.services

    def add_arguments(self, parser):
        parser.add_argument("deployment", type=int, help="Its id (manage.py deployments SLUG).")
        parser.add_argument("--reason", required=True, help="Why (kept in the audit).")

    def handle(self, *args, **options):
        act = getattr(services, self.action)
        try:
            change = act(
                options["deployment"], actor=f"cli:{getpass.getuser()}", reason=options["reason"]
            )
        except OperationError as error:
            raise CommandError(str(error)) from None
        style = self.style.SUCCESS if change.changed else self.style.NOTICE
        self.stdout.write(style(change.message))
