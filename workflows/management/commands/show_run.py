import json

from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder

from workflows import operations, selectors
from workflows.models import Checkpoint


class Command(BaseCommand):
    help = (
        "Show a run: its nodes, states, attempts, durations and the reasons nodes wait or failed."
    )

    def add_arguments(self, parser):
        parser.add_argument("run_id")
        parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    def handle(self, *args, **options):
        try:
            run = operations.get_run(options["run_id"])
        except operations.OperationError as error:
            raise CommandError(str(error)) from None
        detail = selectors.run_detail(run)
        detail["checkpoints"] = list(
            Checkpoint.objects.filter(run=run)
            .order_by("pk")
            .values("id", "kind", "node_run__node_key", "sequence", "attempt", "created_at")
        )
        if options["json"]:
            self.stdout.write(json.dumps(detail, cls=DjangoJSONEncoder, indent=2))
            return
        self.stdout.write(selectors.run_summary_line(run))
        if run.reason:
            self.stdout.write(f"  reason: {run.reason}")
        header = f"  {'node':<24} {'status':<11} {'attempt':>10} {'duration':>9}  reason"
        self.stdout.write(header)
        for node in detail["nodes"]:
            duration = (
                f"{node['duration_seconds']:.1f}s" if node["duration_seconds"] is not None else "-"
            )
            attempts = selectors.attempt_words(
                node["attempt"], node["max_attempts"], node["attempts_base"]
            )
            self.stdout.write(
                f"  {node['key']:<24} {node['status']:<11} {attempts:>10} {duration:>9}  {node['reason']}"
            )
            for attempt in node["attempts"]:
                took = (
                    f"{attempt['duration_seconds']:.2f}s"
                    if attempt["duration_seconds"] is not None
                    else "-"
                )
                error = (
                    f" {attempt['error_type']}: {attempt['error_message'][:80]}"
                    if attempt["error_type"]
                    else ""
                )
                self.stdout.write(
                    f"      #{attempt['number']} {attempt['status']:<10} {took:>8} {attempt['worker'] or '-'}{error}"
                )
        if detail["checkpoints"]:
            self.stdout.write("  checkpoints (for rollback_run --to-checkpoint ID):")
            for checkpoint in detail["checkpoints"][-20:]:
                self.stdout.write(
                    f"      {checkpoint['id']:>6} {checkpoint['kind']:<9} {checkpoint['node_run__node_key'] or '-':<24} "
                    f"seq {checkpoint['sequence']} (attempt {checkpoint['attempt']})"
                )
