import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from diagnostics import explain
from workflows.models import Run

SEVERITY_MARK = {"critical": "✗", "warning": "!", "info": "i"}


class Command(BaseCommand):
    help = (
        "Explain what is wrong with a run (its findings, the evidence, what to do), or list every "
        "open finding when no RUN_ID is given."
    )

    def add_arguments(self, parser):
        parser.add_argument("run_id", nargs="?", type=int, help="The run to diagnose.")
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")

    def handle(self, *args, run_id=None, **options):
        if run_id is None:
            found = explain.open_findings()
            if options["json"]:
                self.print_json({"open_findings": [f.as_dict() for f in found]})
            else:
                self.print_open(found)
            return
        try:
            run = Run.objects.select_related("workflow", "version").get(pk=run_id)
        except Run.DoesNotExist:
            raise CommandError(
                f"No run {run_id}. Run `manage.py diagnose` without an id to see every open "
                "finding, or find the run in the dashboard."
            ) from None
        diagnosis = explain.diagnose_run(run)
        if options["json"]:
            self.print_json(diagnosis.as_dict())
        else:
            self.print_run(diagnosis)

    def print_json(self, data) -> None:
        self.stdout.write(json.dumps(data, indent=2, default=str))

    def print_open(self, found: list[explain.Explanation]) -> None:
        if not found:
            self.stdout.write(self.style.SUCCESS("No open findings: nothing looks stuck."))
            return
        self.stdout.write(f"{len(found)} open finding(s)")
        for code, group in explain.group_by_code(found).items():
            self.stdout.write("")
            self.stdout.write(self.style.MIGRATE_HEADING(f"{code} ({len(group)})"))
            for explanation in group:
                self.print_finding(explanation)

    def print_run(self, diagnosis: explain.RunDiagnosis) -> None:
        style = self.style.SUCCESS if diagnosis.status == "succeeded" else self.style.WARNING
        self.stdout.write(
            style(
                f"Run {diagnosis.run_id} · {diagnosis.workflow} v{diagnosis.version} · "
                f"{diagnosis.status}"
            )
        )
        self.stdout.write(f"  {diagnosis.summary}")
        if not diagnosis.findings:
            self.stdout.write("  No open findings.")
        for explanation in diagnosis.findings:
            self.print_finding(explanation)
        if diagnosis.recently_resolved:
            self.stdout.write("")
            self.stdout.write("  Resolved recently:")
            for explanation in diagnosis.recently_resolved:
                took = (explanation.resolved_at - explanation.first_seen).total_seconds()
                repaired = f"; {explanation.repair}" if explanation.repair else ""
                self.stdout.write(
                    f"    {explanation.code}: {explanation.title} (open "
                    f"{explain.duration_words(took)}{repaired})"
                )
        for action in diagnosis.actions:
            self.stdout.write(f"  → {action['label']}")

    def print_finding(self, e: explain.Explanation) -> None:
        age = explain.duration_words((timezone.now() - e.first_seen).total_seconds())
        mark = SEVERITY_MARK.get(e.severity, "?")
        self.stdout.write("")
        self.stdout.write(f"  {mark} {e.severity.upper()} {e.code}: {e.title}")
        self.stdout.write(f"    seen first {e.first_seen:%Y-%m-%d %H:%M:%S} ({age} ago)")
        self.stdout.write(f"    What it means: {e.meaning}")
        if e.evidence:
            self.stdout.write("    Evidence:")
            width = max(len(label) for label, _ in e.evidence)
            for label, value in e.evidence:
                self.stdout.write(f"      {label:<{width}}  {value}")
        if e.last_log_lines:
            self.stdout.write("    Last log lines:")
            for line in e.last_log_lines:
                self.stdout.write(f"      {line['level']:<7} {line['message']}")
        self.stdout.write(f"    What to do: {e.suggestion}")
        if e.repair:
            self.stdout.write(f"    Done automatically: {e.repair}")
        if e.action:
            self.stdout.write(f"    Action: {e.action['label']}")
