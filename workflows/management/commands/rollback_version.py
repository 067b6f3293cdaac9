from workflows.deployments import services
from workflows.management.deployment_command import VersionRunsCommand


class Command(VersionRunsCommand):
    help = (
        "Make another version of a workflow the one new runs get, at once. Runs on the version "
        "left: --runs finish (default), cancel, or restart (on the chosen version, same params)."
    )
    policies = services.RUN_POLICIES
    version_help = "The version to go back to, e.g. 1."

    def apply(self, workflow, number, **options):
        return services.rollback_version(workflow, number, **options)

    def preview(self, workflow, number):
        preview = services.preview_rollback(workflow, number)
        if preview.noop_message:
            self.stdout.write(preview.noop_message)
            return
        versions = ", ".join(f"v{n}" for n in preview.from_versions)
        self.stdout.write(f"new runs of {preview.workflow}: {versions} -> v{preview.to_version}")
        for what in ("running", "queued", "failed"):
            self.write_ids(f"runs on {versions} {what}", getattr(preview, what))
