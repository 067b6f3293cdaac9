import getpass

from django.core.management.base import BaseCommand, CommandError

from workflows.deployments import services
from workflows.models import Workflow
from workflows.operations import OperationError


class Command(BaseCommand):
    help = (
        "Make another version of a workflow the one new runs get, at once. Runs on the version "
        "left: --runs finish (default), cancel, or restart (on the chosen version, same params)."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("version", type=int, help="The version to go back to, e.g. 1.")
        parser.add_argument("--runs", choices=services.RUN_POLICIES, default="finish")
        parser.add_argument("--reason", help="Why (kept in the audit); required unless --preview.")
        parser.add_argument("--preview", action="store_true", help="Only say what would change.")

    def handle(self, *args, **options):
        try:
            workflow = Workflow.objects.get(slug=options["slug"])
        except Workflow.DoesNotExist:
            raise CommandError(f"No workflow {options['slug']!r}.") from None
        try:
            if options["preview"]:
                preview = services.preview_rollback(workflow, options["version"])
                self._print_preview(preview)
                return
            change = services.rollback_version(
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

    def _print_preview(self, preview) -> None:
        if preview.noop_message:
            self.stdout.write(preview.noop_message)
            return
        versions = ", ".join(f"v{n}" for n in preview.from_versions)
        self.stdout.write(f"new runs of {preview.workflow}: {versions} -> v{preview.to_version}")
        for what in ("running", "queued", "failed"):
            ids = getattr(preview, what)
            listed = ", ".join(str(pk) for pk in ids[:20]) + (" …" if len(ids) > 20 else "")
            self.stdout.write(
                f"  runs on {versions} {what}: {len(ids)}" + (f" ({listed})" if ids else "")
            )
