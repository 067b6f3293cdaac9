"""The bases of the deployment commands: on one deployment (promote, abort), and on a
version and the runs it leaves (rollback_version, move_runs_off)."""

import getpass

from django.core.management.base import BaseCommand, CommandError

from workflows.deployments import services
from workflows.models import Workflow
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


class VersionRunsCommand(BaseCommand):
    """The base of the commands that act on a version of a workflow and the runs it
    leaves (rollback_version, move_runs_off): ``--preview`` only says what would change."""

    policies: tuple[str, ...] = ()  # the --runs choices, the first the default
    version_help = ""

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("version", type=int, help=self.version_help)
        parser.add_argument("--runs", choices=self.policies, default=self.policies[0])
        parser.add_argument("--reason", help="Why (kept in the audit); required unless --preview.")
        parser.add_argument("--preview", action="store_true", help="Only say what would change.")

    def handle(self, *args, **options):
        try:
            workflow = Workflow.objects.get(slug=options["slug"])
        except Workflow.DoesNotExist:
            raise CommandError(f"No workflow {options['slug']!r}.") from None
        try:
            if options["preview"]:
                self.preview(workflow, options["version"])
                return
            change = self.apply(
                workflow,
                options["version"],
                actor=f"cli:{getpass.getuser()}",
                reason=options["reason"],
                runs=options["runs"],
            )
        except OperationError as error:
            raise CommandError(str(error)) from None
        style = self.style.SUCCESS if change.changed else self.style.NOTICE
        self.stdout.write(style(change.message))

    def preview(self, workflow: Workflow, number: int) -> None:
        raise NotImplementedError

    def apply(self, workflow: Workflow, number: int, **options) -> services.Change:
        raise NotImplementedError

    def write_ids(self, label: str, ids: list[int]) -> None:
        listed = ", ".join(str(pk) for pk in ids[:20]) + (" …" if len(ids) > 20 else "")
        self.stdout.write(f"  {label}: {len(ids)}" + (f" ({listed})" if ids else ""))
