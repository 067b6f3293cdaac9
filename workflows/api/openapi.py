"""The OpenAPI 3 document of the API, served at /api/v1/openapi.json.

Request bodies and query parameters come from the same ``inputs.Field`` declarations the
views validate with; response shapes are in schemas.py. The contract test
(tests/api/test_contract.py) checks the API against this document.
"""

from functools import cache

from django.conf import settings

from workflows.api import inputs
from workflows.api.schemas import SCHEMAS, URL, ref

TITLE = "Keel API"
VERSION = "1.0.0"


# --- Requests (inputs.py) ---------------------------------------------------------------------


def field_schema(field: inputs.Field) -> dict:
    if field.kind == "status-list":
        return {"type": "array", "items": {"type": "string", "enum": list(field.enum or ())}}
    if field.kind == "any":
        schema: dict = {}
    else:
        schema = {"type": field.kind}
    if field.kind == "object":
        schema["additionalProperties"] = True
    for key, value in (
        ("minimum", field.minimum),
        ("maximum", field.maximum),
        ("minLength", field.min_length),
        ("maxLength", field.max_length),
        ("pattern", field.pattern),
        ("default", field.default),
    ):
        if value is not None:
            schema[key] = value
    if field.enum:
        schema["enum"] = list(field.enum)
    schema["description"] = field.description
    return schema


def _query_parameters(name: str) -> list[dict]:
    parameters = []
    for field in inputs.QUERIES[name]:
        parameter = {
            "name": field.name,
            "in": "query",
            "required": False,
            "description": field.description,
            "schema": {k: v for k, v in field_schema(field).items() if k != "description"},
        }
        if field.kind == "status-list":
            parameter.update(style="form", explode=False)
        parameters.append(parameter)
    return parameters


def _body(name: str, description: str) -> dict:
    fields = inputs.BODIES[name]
    return {
        "required": name != "start",
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {field.name: field_schema(field) for field in fields},
                    "required": [field.name for field in fields if field.required],
                    "additionalProperties": False,
                }
            }
        },
    }


# --- Responses and parameters -----------------------------------------------------------------


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ref("Error")}}}


def _ok(schema: dict, description: str = "OK", headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


RESPONSES = {
    "BadRequest": _error("Bad input: error.field names the field and the message says why."),
    "Unauthenticated": _error("No or bad credentials: send a bearer token or log in."),
    "Forbidden": _error("Missing permission, or a session POST without a CSRF token."),
    "NotFound": _error("No such workflow, run, node or attempt."),
    "Conflict": _error("The run's state forbids the action now; the message says what to do."),
    "TooLarge": _error("The request body is too large."),
    "Unavailable": _error("The database or Redis is unavailable; retry later."),
}


def _responses(ok: dict, *codes: str) -> dict:
    names = {
        "400": "BadRequest",
        "401": "Unauthenticated",
        "403": "Forbidden",
        "404": "NotFound",
        "409": "Conflict",
        "413": "TooLarge",
        "503": "Unavailable",
    }
    responses = dict(ok)
    for code in ("401", "403", *codes, "503"):
        responses[code] = {"$ref": f"#/components/responses/{names[code]}"}
    return dict(sorted(responses.items()))


PATH_PARAMETERS = {
    "slug": {
        "name": "slug",
        "in": "path",
        "required": True,
        "description": "The workflow's slug.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 100},
    },
    "run_id": {
        "name": "run_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": inputs.MAX_ID},
    },
    "node_key": {
        "name": "node_key",
        "in": "path",
        "required": True,
        "description": "The node's key in the definition.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 100},
    },
}
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Any unique string (e.g. a UUID). Sending the same request again with the "
    "same key changes nothing and answers changed=false.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": inputs.IDEMPOTENCY_KEY_MAX,
        "pattern": "^[!-~]+$",
    },
}


def _params(*names: str) -> list[dict]:
    return [{"$ref": f"#/components/parameters/{name}"} for name in names]


# --- Operations -------------------------------------------------------------------------------

RUN_ACTIONS = {
    "resume": (
        "Resume a failed or cancelled run",
        "Re-opens the run on its pinned version: succeeded nodes keep their outputs, every "
        "other node runs again from its latest progress checkpoint.",
    ),
    "cancel": ("Cancel a run", "Queued nodes are dropped and running ones stopped."),
    "rollback": (
        "Roll a run back to a checkpoint or to just before a node",
        "Runs the compensate hooks of the nodes completed after that point (newest first), "
        "resets them and their downstream, then resumes unless resume is false. The run must "
        "not be running: cancel it first.",
    ),
}
NODE_ACTIONS = {
    "retry": (
        "retry",
        "Give a node a new attempt",
        "Ends a stuck attempt if there is one; with downstream=true also resets the nodes "
        "after it.",
    ),
    "skip": ("skip", "Skip a node", "Its downstream may proceed as if it had succeeded."),
    "mark-succeeded": (
        "mark_succeeded",
        "Mark a node succeeded with an output you give",
        "For work done by hand: downstream nodes see the given output.",
    ),
}


def _action_operation(action: str, summary: str, description: str, *path_params: str) -> dict:
    return {
        "post": {
            "operationId": f"{action}",
            "summary": summary,
            "description": description
            + " Needs the workflows.operate_run permission (a denial is recorded in the run's "
            "history). With dry_run=true it answers the preview instead and changes nothing "
            "(reason is then optional). Answers changed=false when there is nothing to do.",
            "tags": ["actions"],
            "parameters": [
                *_params(*path_params),
                *_query_parameters("action"),
                _params("IdempotencyKey")[0],
            ],
            "requestBody": _body(action, "Why, and the action's options."),
            "responses": _responses(
                {
                    "200": _ok(
                        {"oneOf": [ref("ActionResult"), ref("PreviewResult")]},
                        "The outcome and the run as it is now; or, with dry_run, the preview.",
                    )
                },
                "400",
                "404",
                "409",
                "413",
            ),
        }
    }


def _get(operation_id: str, summary: str, schema: str, *, parameters: list, codes=("404",)):
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["reads"],
            "parameters": parameters,
            "responses": _responses({"200": _ok(ref(schema))}, "400", *codes),
        }
    }


@cache
def document() -> dict:
    """The whole document; built once per process (it depends only on code and settings)."""
    paths = {
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["meta"],
                "security": [],
                "responses": {"200": _ok({"type": "object"})},
            }
        },
        "/workflows": _get(
            "listWorkflows",
            "Workflows, by slug",
            "WorkflowPage",
            parameters=_query_parameters("workflows"),
            codes=(),
        ),
        "/workflows/{slug}": _get(
            "getWorkflow",
            "A workflow and its latest version",
            "WorkflowDetail",
            parameters=_params("slug"),
        ),
        "/workflows/{slug}/runs": {
            **_get(
                "listWorkflowRuns",
                "The workflow's runs, newest first",
                "RunPage",
                parameters=[*_params("slug"), *_query_parameters("workflow_runs")],
            ),
            "post": {
                "operationId": "startRun",
                "summary": "Start a run of the workflow's latest version",
                "description": "Waits up to `wait` seconds (default 10, at most 180, never "
                "longer than the workflow's timeout) for the run to finish. Answers 200 with "
                "the final state if it did, else 202 with the state so far and a Location "
                "header to poll. Needs the workflows.operate_run permission. A repeat with the "
                "same Idempotency-Key starts nothing and answers the run the first request started.",
                "tags": ["actions"],
                "parameters": [*_params("slug"), _params("IdempotencyKey")[0]],
                "requestBody": _body("start", "Run params, priority and how long to wait."),
                "responses": _responses(
                    {
                        "200": _ok(ref("RunDetail"), "The run finished within the wait."),
                        "202": _ok(
                            ref("RunDetail"),
                            "The run is still going; poll the Location.",
                            headers={
                                "Location": {
                                    "description": "The run's URL.",
                                    "schema": URL,
                                }
                            },
                        ),
                    },
                    "400",
                    "404",
                    "409",
                    "413",
                ),
            },
        },
        "/runs": _get(
            "listRuns",
            "Runs, newest first",
            "RunPage",
            parameters=_query_parameters("runs"),
            codes=(),
        ),
        "/runs/{run_id}": _get(
            "getRun", "A run with its nodes", "RunDetail", parameters=_params("run_id")
        ),
        "/runs/{run_id}/events": _get(
            "listRunEvents",
            "The run's history: transitions and operator actions, oldest first",
            "EventPage",
            parameters=[*_params("run_id"), *_query_parameters("events")],
        ),
        "/runs/{run_id}/checkpoints": _get(
            "listRunCheckpoints",
            "The run's checkpoints (what rollback can go back to), oldest first",
            "CheckpointPage",
            parameters=[*_params("run_id"), *_query_parameters("checkpoints")],
        ),
        "/runs/{run_id}/nodes/{node_key}/attempts": _get(
            "listNodeAttempts",
            "A node's attempts, with errors and tracebacks",
            "AttemptPage",
            parameters=[*_params("run_id", "node_key"), *_query_parameters("attempts")],
        ),
        "/runs/{run_id}/nodes/{node_key}/logs": _get(
            "listNodeLogs",
            "One attempt's log lines, oldest first",
            "LogPage",
            parameters=[*_params("run_id", "node_key"), *_query_parameters("logs")],
        ),
    }
    for segment, (summary, description) in RUN_ACTIONS.items():
        paths[f"/runs/{{run_id}}/{segment}"] = _action_operation(
            segment, summary, description, "run_id"
        )
    for segment, (action, summary, description) in NODE_ACTIONS.items():
        paths[f"/runs/{{run_id}}/nodes/{{node_key}}/{segment}"] = _action_operation(
            action, summary, description, "run_id", "node_key"
        )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Runs, their nodes, attempts and logs; operator actions (resume, "
            "retry, rollback, cancel, skip, mark succeeded). Errors are "
            '{"error": {"code", "message", "field"}}. See docs/api.md.',
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}, {"sessionAuth": []}],
        "tags": [
            {"name": "reads"},
            {"name": "actions"},
            {"name": "meta"},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from manage.py create_api_token USERNAME --name ...",
                },
                "sessionAuth": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": settings.SESSION_COOKIE_NAME,
                    "description": "A dashboard login. POSTs must also send the csrftoken "
                    "cookie's value in an X-CSRFToken header.",
                },
            },
            "parameters": {
                **PATH_PARAMETERS,
                "IdempotencyKey": IDEMPOTENCY_HEADER,
            },
            "responses": RESPONSES,
            "schemas": SCHEMAS,
        },
    }
