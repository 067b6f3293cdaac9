"""Find the workflow, run or node a URL names, or answer a 404 that says where to look."""

from workflows.api.errors import ApiError, invalid
from workflows.api.schemas import MAX_ID, NODE_COLUMNS
from workflows.models import NodeRun, Run, Workflow


def get_workflow(slug: str) -> Workflow:
    workflow = Workflow.objects.filter(slug=slug).first() if "\x00" not in slug else None
    if workflow is None:
        raise ApiError(
            404,
            f"No workflow {slug!r}. List workflows at GET /api/v1/workflows, or load one with "
            "manage.py load_workflow PATH.",
        )
    return workflow


def runs():
    return Run.objects.with_version()


def get_run(run_id: int, *, with_nodes: bool = False) -> Run:
    """The run (404 if none); ``with_nodes`` also reads its nodes, in definition order."""
    run = runs().filter(pk=run_id).first() if 0 < run_id <= MAX_ID else None
    if run is None:
        raise ApiError(404, f"No run {run_id}. List runs at GET /api/v1/runs.")
    if with_nodes:
        run.api_nodes = list(
            NodeRun.objects.filter(run=run).order_by("id").values(*NODE_COLUMNS.values())
        )
    return run


def get_node(run: Run, key: str, *, field: str | None = None) -> NodeRun:
    """The run's node ``key``: a 404 naming the nodes it has, or a 400 on ``field``."""
    node = NodeRun.objects.filter(run=run, node_key=key).first() if "\x00" not in key else None
    if node is None:
        keys = list(
            NodeRun.objects.filter(run=run).order_by("id").values_list("node_key", flat=True)[:20]
        )
        message = f"run {run.pk} has no node {key!r} (its nodes: {', '.join(keys)})."
        if field:
            raise invalid(field, message)
        raise ApiError(404, message[0].upper() + message[1:])
    return node
