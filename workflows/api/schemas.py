"""The response shapes of the API as OpenAPI 3.0 schemas, mirroring serializers.py field
by field. Objects are closed (``additionalProperties: false``), so the contract test fails
the moment a serializer returns a field this file does not list.
"""

from workflows.api.errors import API_ERROR_STATUSES
from workflows.models import AttemptStatus, CheckpointKind, NodeRunStatus, Run, RunEventKind

# --- Schema building blocks -------------------------------------------------------------------


def nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
URL = {"type": "string", "format": "uri"}
DATETIME = {"type": "string", "format": "date-time"}
ANY: dict = {}  # any JSON value, null included


def _object(properties: dict, *, optional: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str, **extra) -> dict:
    return _object(
        {
            **extra,
            "results": {"type": "array", "items": ref(item)},
            "next": {
                **nullable(URL),
                "description": "The next page, or null on the last one.",
            },
        }
    )


# --- Response shapes (serializers.py) ---------------------------------------------------------

RUN_STATUS = {"type": "string", "enum": list(Run.Status.values)}
RUN_SUMMARY = {
    "id": INTEGER,
    "url": URL,
    "web_url": {**URL, "description": "The run's page in the dashboard."},
    "workflow": {**STRING, "description": "The workflow's slug."},
    "version": {**INTEGER, "description": "The version number the run is pinned to."},
    "status": RUN_STATUS,
    "finished": {**BOOLEAN, "description": "True once the status is terminal."},
    "reason": {**STRING, "description": "Why the run failed or was cancelled."},
    "trigger": {**STRING, "description": "Who or what started it."},
    "priority": {"type": "string", "enum": list(Run.Priority.values)},
    "params": {"type": "object", "additionalProperties": True},
    "created_at": DATETIME,
    "started_at": nullable(DATETIME),
    "finished_at": nullable(DATETIME),
    "deadline": nullable(DATETIME),
    "duration_seconds": nullable(NUMBER),
}
NODE_STATE = {
    "key": STRING,
    "type": {**STRING, "description": "The registered node type."},
    "status": {"type": "string", "enum": list(NodeRunStatus.values)},
    "attempt": {**INTEGER, "description": "The current attempt's number (0: never queued)."},
    "max_attempts": INTEGER,
    "queue": STRING,
    "pool": {**STRING, "description": "The resource pool it takes a slot of ('' for none)."},
    "after": {"type": "array", "items": STRING, "description": "Upstream node keys."},
    "reason": {**STRING, "description": "Why the node waits or failed."},
    "progress": ANY,
    "output": ANY,
    "heartbeat_at": nullable(DATETIME),
    "queued_at": nullable(DATETIME),
    "started_at": nullable(DATETIME),
    "finished_at": nullable(DATETIME),
    "retry_at": nullable(DATETIME),
    "duration_seconds": nullable(NUMBER),
    "attempts_url": URL,
    "logs_url": URL,
}
ATTEMPT = {
    "number": INTEGER,
    "status": {"type": "string", "enum": list(AttemptStatus.values)},
    "queue": STRING,
    "rq_job_id": STRING,
    "worker": STRING,
    "host": STRING,
    "pid": nullable(INTEGER),
    "created_at": DATETIME,
    "started_at": nullable(DATETIME),
    "finished_at": nullable(DATETIME),
    "duration_seconds": nullable(NUMBER),
    "error_type": STRING,
    "error_message": STRING,
    "traceback": STRING,
    "cpu_percent": nullable(NUMBER),
    "rss_bytes": nullable(INTEGER),
    "io_wait_percent": nullable(NUMBER),
}
PREVIEW_NODE = {
    "key": STRING,
    "type": STRING,
    "status": STRING,
    "will": {**STRING, "description": "What the action does to it, in words."},
    "queue": STRING,
    "pool": STRING,
    "side_effects": BOOLEAN,
    "has_compensate": BOOLEAN,
    "warning": STRING,
}
WORKFLOW_SUMMARY = {
    "slug": STRING,
    "name": STRING,
    "description": STRING,
    "latest_version": nullable(INTEGER),
    "url": URL,
    "runs_url": URL,
}

SCHEMAS = {
    "Error": _object(
        {
            "error": _object(
                {
                    "code": {
                        "type": "string",
                        "enum": sorted({*API_ERROR_STATUSES.values(), "csrf_failed"}),
                    },
                    "message": {**STRING, "description": "What went wrong and what to do."},
                    "field": {**STRING, "description": "The input field at fault (400 only)."},
                },
                optional=("field",),
            )
        }
    ),
    "WorkflowSummary": _object(WORKFLOW_SUMMARY),
    "WorkflowDetail": _object(
        {
            **WORKFLOW_SUMMARY,
            "created_at": DATETIME,
            "updated_at": DATETIME,
            "latest": nullable(
                _object(
                    {
                        "number": INTEGER,
                        "created_at": DATETIME,
                        "created_by": STRING,
                        "note": STRING,
                        "checksum": STRING,
                        "timeout": {
                            **nullable(INTEGER),
                            "description": "The whole run's timeout in seconds.",
                        },
                        "params": {
                            "type": "object",
                            "additionalProperties": True,
                            "description": "Declared run params and their defaults.",
                        },
                        "nodes": {"type": "array", "items": STRING},
                    }
                )
            ),
        }
    ),
    "WorkflowPage": _page("WorkflowSummary"),
    "RunSummary": _object(RUN_SUMMARY),
    "Node": _object(NODE_STATE),
    "RunDetail": _object(
        {
            **RUN_SUMMARY,
            "events_url": URL,
            "checkpoints_url": URL,
            "nodes": {"type": "array", "items": ref("Node")},
        }
    ),
    "RunPage": _page("RunSummary"),
    "Attempt": _object(ATTEMPT),
    "AttemptPage": _page("Attempt", run=INTEGER, node=STRING),
    "LogLine": _object({"seq": INTEGER, "at": DATETIME, "level": STRING, "message": STRING}),
    "LogPage": _page(
        "LogLine",
        run=INTEGER,
        node=STRING,
        attempt={**nullable(INTEGER), "description": "null when the node never ran."},
    ),
    "Event": _object(
        {
            "id": INTEGER,
            "at": DATETIME,
            "kind": {"type": "string", "enum": list(RunEventKind.values)},
            "actor": STRING,
            "reason": STRING,
            "node": nullable(STRING),
            "before": ANY,
            "after": ANY,
        }
    ),
    "EventPage": _page("Event", run=INTEGER),
    "Checkpoint": _object(
        {
            "id": INTEGER,
            "node": nullable(STRING),
            "kind": {"type": "string", "enum": list(CheckpointKind.values)},
            "sequence": INTEGER,
            "attempt": INTEGER,
            "created_at": DATETIME,
            "state": ANY,
        }
    ),
    "CheckpointPage": _page("Checkpoint", run=INTEGER),
    "PreviewNode": _object(PREVIEW_NODE),
    "Preview": _object(
        {
            "action": STRING,
            "run_id": INTEGER,
            "workflow": STRING,
            "version": INTEGER,
            "run_status": RUN_STATUS,
            "noop_message": {
                **STRING,
                "description": "Non-empty when the action has nothing to do now.",
            },
            "warnings": {"type": "array", "items": STRING},
            "nodes": {"type": "array", "items": ref("PreviewNode")},
        }
    ),
    "ActionResult": _object(
        {
            "changed": {
                **BOOLEAN,
                "description": "False when there was nothing to do, or this Idempotency-Key "
                "was already applied.",
            },
            "message": STRING,
            "run": ref("RunDetail"),
        }
    ),
    "PreviewResult": _object({"preview": ref("Preview")}),
}
