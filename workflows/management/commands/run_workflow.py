import getpass
import json
import time

from django.core.management.base import BaseCommand, CommandError

from workflows import operations, selectors
from workflows.models import Run

EXIT_FAILED = 1
EXIT_STILL_RUNNING = 3


class Command(BaseCommand):
    help = (
        "Start a run on the version the workflow's deployments choose (or --workflow-version "
        "N). With --wait, wait for it: exit 0 when it "
        "succeeded, 1 when it failed or was cancelled, 3 when it was still running at the end."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument(
            "--params",
            default="{}",
            help='Run params as a JSON object, e.g. \'{"date": "2026-01-31"}\'.',
        )
        parser.add_argument("--priority", default="default", choices=Run.Priority.values)
        parser.add_argument(
            "--workflow-version",
            type=int,
            metavar="N",
            help="Run version N, outside any deployment (the live version otherwise).",
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=0,
            metavar="SECONDS",
            help="Wait up to this long for the run to finish.",
        )

    def handle(self, *args, **options):
        try:
            params = json.loads(options["params"])
        except json.JSONDecodeError as error:
            raise CommandError(
                f"--params is not valid JSON ({error}); pass an object like '{{\"key\": 1}}'."
            ) from None
        try:
            run = operations.start_run(
                options["slug"],
                actor=f"cli:{getpass.getuser()}",
                params=params,
                priority=options["priority"],
                version_number=options["workflow_version"],
            )
        except operations.OperationError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"run {run.pk} of {run.workflow.slug} v{run.version.number} started")
        if options["wait"] <= 0:
            return
        run = self._wait(run, options["wait"])
        summary = selectors.run_summary_line(run)
        if run.status == Run.Status.SUCCEEDED:
            self.stdout.write(self.style.SUCCESS(summary))
            return
        if run.status in Run.TERMINAL:
            self.stdout.write(self.style.ERROR(summary))
            if run.reason:
                self.stdout.write(f"  reason: {run.reason}")
            self.stdout.write(f"  see: manage.py show_run {run.pk}")
            raise SystemExit(EXIT_FAILED)
        self.stdout.write(
            self.style.WARNING(f"{summary} (still running after {options['wait']:g}s)")
        )
        raise SystemExit(EXIT_STILL_RUNNING)

    def _wait(self, run: Run, seconds: float) -> Run:
        deadline = time.monotonic() + seconds
        while True:
            run.refresh_from_db()
            if run.status in Run.TERMINAL or time.monotonic() >= deadline:
                return run
            time.sleep(0.2)
