"""Operator actions on runs and nodes, one endpoint per action of the registry
(workflows/actions.py): POST /runs/{run_id}/{action} and, for actions on one node,
POST /runs/{run_id}/nodes/{node_key}/{action}.

Each endpoint's body is the action's ``input_model()`` (reason and options), so the
document lists every action's options. ``?dry_run=1`` answers the preview instead and
changes nothing (reason is then optional). The operation checks the operate permission
itself and records a denial in the run's history; the endpoint only asks that the caller
may see runs or operate them.
"""

import copy
import json

import pydantic
from django.conf import settings
from ninja import Query, Router

from workflows import actions as registry
from workflows import operations
from workflows.api import idempotency, lookups
from workflows.api.auth import OPERATE_PERMISSION, VIEW_PERMISSION, require
from workflows.api.errors import ApiError, from_validation, invalid
from workflows.api.parser import parser
from workflows.api.schemas import ActionQuery, ActionResult, PreviewResult, errors
from workflows.models import Checkpoint

router = Router(tags=["actions"])

NODE_OPTION = "node"  # an action with this option acts on one node: the URL names it
DRY_RUN_REASON = "(dry run)"


def _segment(action) -> str:
    return action.name.replace("_", "-")


def _body_schema(action, *, node: bool) -> dict:
    """The action's input model as a JSON schema; a node action's node is in the URL."""
    schema = copy.deepcopy(action.input_model().model_json_schema())
    if node:
        schema.get("properties", {}).pop(NODE_OPTION, None)
        schema["required"] = [name for name in schema.get("required", []) if name != NODE_OPTION]
    schema.pop("title", None)
    return schema


def _openapi(action, *, node: bool) -> dict:
    extra = copy.deepcopy(idempotency.OPENAPI)
    extra["requestBody"] = {
        "required": False,
        "description": "Why (reason), and the action's options.",
        "content": {"application/json": {"schema": _body_schema(action, node=node)}},
    }
    return extra


def _add(action) -> None:
    node = any(option.name == NODE_OPTION for option in action.options)
    description = (
        f"{action.description} Needs the {action.permission or OPERATE_PERMISSION} permission "
        "(a denial is recorded in the run's history). With dry_run=true it answers the preview "
        "instead and changes nothing. Answers changed=false when there is nothing to do."
    )
    common = {
        "response": {200: ActionResult | PreviewResult, **errors(400, 404, 409, 413)},
        "operation_id": action.name,
        "summary": action.label,
        "description": description,
        "openapi_extra": _openapi(action, node=node),
    }
    if node:

        @router.post(
            f"/runs/{{int:run_id}}/nodes/{{node_key}}/{_segment(action)}",
            url_name=f"node-{_segment(action)}",
            **common,
        )
        def node_action(request, run_id: int, node_key: str, query: Query[ActionQuery]):
            require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
            run = lookups.get_run(run_id)
            node = lookups.get_node(run, node_key)
            return act(request, action, run, query.dry_run, node=node.node_key)

        node_action.__name__ = f"node_{action.name}"
    else:

        @router.post(
            f"/runs/{{int:run_id}}/{_segment(action)}",
            url_name=f"run-{_segment(action)}",
            **common,
        )
        def run_action(request, run_id: int, query: Query[ActionQuery]):
            require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
            return act(request, action, lookups.get_run(run_id), query.dry_run)

        run_action.__name__ = f"run_{action.name}"


def act(request, action, run, dry_run: bool, *, node: str | None = None):
    """Check the input, then preview or perform the action on ``run``."""
    data = parser.parse_body(request)
    if node is not None:
        data = {**data, NODE_OPTION: node}
    if dry_run and "reason" not in data:
        data = {**data, "reason": DRY_RUN_REASON}
    try:
        action.input_model().model_validate(data)
        cleaned = dict(action.clean(data))
    except pydantic.ValidationError as error:
        raise from_validation(error.errors(include_url=False)) from None
    except registry.ActionInputError as error:
        field = getattr(error, "field", None) or "body"
        message = str(error)
        raise ApiError(
            400, message if message.startswith(f"{field}:") else f"{field}: {message}", field=field
        ) from None
    reason = cleaned.pop("reason", "")
    _check_options(run, action.name, cleaned)
    if dry_run:
        preview = action.preview(run.pk, **cleaned)
        if preview is None:
            raise invalid("dry_run", f"{action.name} has no preview; leave dry_run out.")
        return {"preview": preview}
    outcome = action.perform(
        run.pk,
        actor=operations.Actor.for_user(request.user),
        reason=reason,
        request_key=idempotency.request_key(request),
        **cleaned,
    )
    return {
        "changed": outcome.changed,
        "message": outcome.message,
        "run": lookups.get_run(run.pk, with_nodes=True),
    }


def _check_options(run, action: str, options: dict) -> None:
    """What the operation would refuse as bad input, refused here as a 400 naming the field."""
    if action == "rollback":
        given = [name for name in ("to_checkpoint", "to_node") if options.get(name) is not None]
        if len(given) != 1:
            raise invalid(
                "to_checkpoint",
                "give exactly one of to_checkpoint (an id from GET "
                f"/api/v1/runs/{run.pk}/checkpoints) and to_node (a node key).",
            )
        checkpoint = options.get("to_checkpoint")
        if (
            checkpoint is not None
            and not Checkpoint.objects.filter(pk=checkpoint, run=run).exists()
        ):
            raise invalid(
                "to_checkpoint",
                f"run {run.pk} has no checkpoint {checkpoint}; list them at "
                f"GET /api/v1/runs/{run.pk}/checkpoints.",
            )
        if options.get("to_node") is not None:
            lookups.get_node(run, options["to_node"], field="to_node")
    if action == "mark_succeeded":
        size = len(json.dumps(options.get("output") or {}))
        if size > settings.KEEL_MAX_OUTPUT_BYTES:
            raise invalid(
                "output",
                f"is {size} bytes as JSON, over the limit of {settings.KEEL_MAX_OUTPUT_BYTES} "
                "(KEEL_MAX_OUTPUT_BYTES); store big results elsewhere and give a reference.",
            )


for _action in registry.for_target("run"):
    _add(_action)
