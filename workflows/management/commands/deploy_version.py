import getpass

from django.core.management.base import BaseCommand, CommandError

from workflows.deployments import services
from workflows.models import Deployment, Workflow
from workflows.operations import OperationError


class Command(BaseCommand):
    help = (
        "Deploy a version of a workflow: immediate (every new run), canary (a growing share of "
        "new runs, judged against the live version) or blue_green (after a validation run)."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("version", type=int, help="The version number, e.g. 3.")
        parser.add_argument(
            "--strategy",
            choices=Deployment.Strategy.values,
            help="Default: the definition's deploy section, else immediate.",
        )
        parser.add_argument("--steps", help="Canary steps in %% of new runs, e.g. 10,50,100.")
        parser.add_argument(
            "--min-runs", type=int, help="Canary runs a step needs before it is judged."
        )
        parser.add_argument(
            "--key-param", help="Keep runs with the same value of this param on one version."
        )
        parser.add_argument("--reason", required=True, help="Why (kept in the audit).")

    def handle(self, *args, **options):
        try:
            workflow = Workflow.objects.get(slug=options["slug"])
            version = workflow.versions.get(number=options["version"])
        except (Workflow.DoesNotExist, Workflow.versions.rel.related_model.DoesNotExist):
            raise CommandError(
                f"No version {options['version']} of {options['slug']!r}; "
                "list versions with manage.py deployments SLUG."
            ) from None
        try:
            change = services.deploy(
                version,
                actor=f"cli:{getpass.getuser()}",
                reason=options["reason"],
                strategy=options["strategy"],
                steps=options["steps"].split(",") if options["steps"] else None,
                min_runs=options["min_runs"],
                key_param=options["key_param"],
            )
        except OperationError as error:
            raise CommandError(str(error)) from None
        style = self.style.SUCCESS if change.changed else self.style.NOTICE
        self.stdout.write(style(change.message))
