from django.core.management.base import BaseCommand, CommandError

from workflows.models import Deployment, Workflow


class Command(BaseCommand):
    help = "A workflow's versions and deployments, newest first: which version new runs get."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--limit", type=int, default=20)

    def handle(self, *args, **options):
        try:
            workflow = Workflow.objects.get(slug=options["slug"])
        except Workflow.DoesNotExist:
            raise CommandError(f"No workflow {options['slug']!r}.") from None
        versions = ", ".join(f"v{n}" for n in workflow.versions.values_list("number", flat=True))
        self.stdout.write(f"{workflow.slug}: versions {versions}")
        deployments = Deployment.objects.filter(workflow=workflow).select_related(
            "version", "baseline"
        )[: options["limit"]]
        for d in deployments:
            share = f" {d.percent}%" if d.state == Deployment.State.RAMPING else ""
            against = f" vs v{d.baseline.number}" if d.baseline else ""
            line = (
                f"  #{d.pk} v{d.version.number} {d.strategy} {d.state}{share}{against} "
                f"by {d.actor} at {d.created_at:%Y-%m-%d %H:%M:%S}: {d.reason}"
            )
            self.stdout.write(line)
            if d.outcome:
                self.stdout.write(f"      {d.outcome}")
            verdict = (d.evidence or {}).get("reason")
            if verdict and verdict != d.outcome:
                self.stdout.write(f"      analysis: {verdict}")
