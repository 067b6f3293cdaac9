import getpass

from django.core.management.base import BaseCommand, CommandError

from workflows.definitions import versioning
from workflows.definitions.spec import DefinitionError
from workflows.models import Deployment
from workflows.operations import OperationError


class Command(BaseCommand):
    help = "Load workflow definitions (YAML or JSON); a new version is created only when the content changed."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", help="Definition files.")
        parser.add_argument(
            "--note", default="", help="Why this version exists (shown in its history)."
        )
        parser.add_argument(
            "--deploy",
            default="default",
            choices=["default", "none", *Deployment.Strategy.values],
            help="How a new version is deployed: the definition's deploy section (default; "
            "immediate without one), not at all (none), or this strategy.",
        )

    def handle(self, *args, **options):
        actor = f"cli:{getpass.getuser()}"
        # Validate every file before writing any, so a bad file in a batch writes nothing.
        errors = []
        for path in options["paths"]:
            try:
                versioning.load_file(path, actor=actor, note=options["note"], dry_run=True)
            except DefinitionError as error:
                errors.append(str(error))
        if errors:
            raise CommandError(
                "\n".join(errors) + "\nNothing was loaded. Fix the fields above and run again."
            )
        for path in options["paths"]:
            deploy = None if options["deploy"] == "none" else options["deploy"]
            try:
                result = versioning.load_file(
                    path, actor=actor, note=options["note"], deploy=deploy
                )
            except OperationError as error:
                raise CommandError(f"{path}: {error}") from None
            style = self.style.SUCCESS if result.created else self.style.NOTICE
            self.stdout.write(style(str(result)))
