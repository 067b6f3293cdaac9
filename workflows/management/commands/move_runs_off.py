from django.core.management.base import CommandError

from workflows.deployments import services
from workflows.management.deployment_command import VersionRunsCommand


class Command(VersionRunsCommand):
    help = (
        "End the unfinished runs of a version new runs no longer get (aborted, rolled back, "
        "replaced): --runs restart (default: cancelled, then started again on the live version "
        "with the same params) or cancel."
    )
    policies = services.MOVE_POLICIES
    version_help = "The version the runs are on, e.g. 2."

    def apply(self, workflow, number, **options):
        return services.move_runs_off(workflow, number, **options)

    def preview(self, workflow, number):
        preview = services.preview_runs_left(workflow, number)
        if preview.refusal:
            raise CommandError(preview.refusal)
        self.stdout.write(
            f"{preview.total} unfinished run(s) of {preview.workflow} v{preview.from_version}; "
            f"restarted, they run v{preview.to_version}"
        )
        for what in ("running", "queued"):
            self.write_ids(what, getattr(preview, what))
