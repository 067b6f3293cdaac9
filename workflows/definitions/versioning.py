"""Turning definition files into immutable workflow versions."""

from dataclasses import dataclass
from pathlib import Path

from django.db import transaction

from workflows.definitions import limits
from workflows.definitions import spec as spec_module
from workflows.deployments import services
from workflows.models import ResourcePool, Workflow, WorkflowVersion


@dataclass(frozen=True)
class LoadResult:
    version: WorkflowVersion
    created: bool
    deployed: str = ""  # what its deployment did, unless it went live at once

    def __str__(self):
        state = "created" if self.created else "unchanged"
        text = f"{self.version.workflow.slug} v{self.version.number} {state}"
        return f"{text}; {self.deployed}" if self.deployed else text


def load_definition(
    source: str,
    *,
    actor: str,
    source_name: str = "definition",
    note: str = "",
    dry_run: bool = False,
    once: bool = False,
    deploy: str | None = "default",
) -> LoadResult | None:
    """Validate a definition and store it as a new version if its content changed, then
    deploy that new version: by ``deploy`` (a strategy), by the definition's own
    ``deploy`` section when "default" (immediate without one), not at all when None.

    Content means the normalised spec: comments and formatting do not make a version.
    An invalid definition raises ``spec.DefinitionError`` and writes nothing;
    ``dry_run`` only validates. With ``once``, content that any version of the workflow
    ever had is not loaded again (devstack's demos: a newer version an operator loaded
    stays the latest until the file itself changes).
    """
    definition = spec_module.parse(source, source_name=source_name)
    if dry_run:
        return None
    parsed = definition.spec
    with transaction.atomic():
        workflow, _ = Workflow.objects.get_or_create(
            slug=parsed["slug"],
            defaults={"name": parsed["name"], "description": parsed["description"]},
        )
        # Serialise concurrent loads of one workflow, so version numbers never collide.
        workflow = Workflow.objects.select_for_update(no_key=True).get(pk=workflow.pk)
        latest = workflow.versions.order_by("-number").first()
        if latest is not None and latest.checksum == definition.checksum:
            return LoadResult(latest, created=False)
        if once and workflow.versions.filter(checksum=definition.checksum).exists():
            return LoadResult(latest, created=False)
        if (workflow.name, workflow.description) != (parsed["name"], parsed["description"]):
            workflow.name, workflow.description = parsed["name"], parsed["description"]
            workflow.save(update_fields=["name", "description", "updated_at"])
        for pool_name, slots in parsed["pools"].items():
            # An operator may have resized the pool since; the definition only seeds it.
            ResourcePool.objects.get_or_create(name=pool_name, defaults={"slots": slots})
        version = WorkflowVersion.objects.create(
            workflow=workflow,
            number=(latest.number + 1) if latest else 1,
            spec=parsed,
            source=source,
            checksum=definition.checksum,
            created_by=actor,
            note=note,
        )
        deployed = ""
        if deploy is not None:
            change = services.deploy(
                version,
                actor=actor,
                reason=note or f"loaded from {source_name}",
                strategy=None if deploy == "default" else deploy,
            )
            # Live at once is what loading always meant; anything else is said.
            if change.deployment.state != change.deployment.State.ACTIVE:
                deployed = change.message
    return LoadResult(version, created=True, deployed=deployed)


def load_file(
    path: Path,
    *,
    actor: str,
    note: str = "",
    dry_run: bool = False,
    once: bool = False,
    deploy: str | None = "default",
) -> LoadResult | None:
    limit = limits.MAX_FILE_BYTES
    try:
        # Read one byte past the limit, never the whole of a huge file.
        with Path(path).open("rb") as file:
            data = file.read(limit + 1)
        if len(data) > limit:
            raise spec_module.DefinitionError(
                [("(file)", f"is over {limit} bytes; definitions are limited to {limit} bytes")],
                str(path),
            )
        # As read_text() does: universal newlines.
        source = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, UnicodeDecodeError) as error:
        raise spec_module.DefinitionError(
            [("(file)", f"cannot be read: {error}")], str(path)
        ) from None
    return load_definition(
        source,
        actor=actor,
        source_name=str(path),
        note=note,
        dry_run=dry_run,
        once=once,
        deploy=deploy,
    )


def latest_version(workflow: Workflow) -> WorkflowVersion | None:
    return workflow.versions.order_by("-number").first()
