import json

from django.core.management.base import BaseCommand, CommandError

from diagnostics import system_report


class Command(BaseCommand):
    help = (
        "Start-up checks from the troubleshooting runbook: settings, database and migrations, "
        "Redis and its eviction policy, a worker per queue, a live watchdog, free disk, clock "
        "skew. One line each, ✓ or ✗ with the fix; exits non-zero if any check fails."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print the checks as JSON.")

    def handle(self, *args, **options):
        checks = system_report.doctor_checks()
        failed = [check for check in checks if not check.ok]
        if options["json"]:
            self.stdout.write(json.dumps([check.as_dict() for check in checks], indent=2))
        else:
            for check in checks:
                self.stdout.write(self._line(check))
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(checks)} checks failed. Fix them from the top (later "
                "checks often fail because of an earlier one) and run manage.py doctor again."
            )
        if not options["json"]:
            self.stdout.write(self.style.SUCCESS(f"All {len(checks)} checks passed."))

    def _line(self, check) -> str:
        if check.ok:
            return f"{self.style.SUCCESS('✓')} {check.name}: {check.detail}"
        return f"{self.style.ERROR('✗')} {check.name}: {check.detail} — fix: {check.fix}"
