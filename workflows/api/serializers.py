"""The JSON shapes of the API. openapi.py documents each one; keep the two in step
(the contract test fails on any field the document does not list).

Each function takes rows already fetched: the queries live in the views, bounded and
without per-row lookups.
"""

from django.urls import reverse


def api_url(request, name: str, *args) -> str:
    return request.build_absolute_uri(reverse(f"api:{name}", args=args))


def _seconds(start, end):
    if start and end:
        return round((end - start).total_seconds(), 3)
    return None


def workflow_summary(request, workflow, latest_number) -> dict:
    return {
        "slug": workflow.slug,
        "name": workflow.name,
        "description": workflow.description,
        "latest_version": latest_number,
        "url": api_url(request, "workflow-detail", workflow.slug),
        "runs_url": api_url(request, "workflow-runs", workflow.slug),
    }


def workflow_detail(request, workflow, version) -> dict:
    latest = None
    if version is not None:
        spec = version.spec
        latest = {
            "number": version.number,
            "created_at": version.created_at,
            "created_by": version.created_by,
            "note": version.note,
            "checksum": version.checksum,
            "timeout": spec.get("timeout"),
            "params": spec.get("params") or {},
            "nodes": list(spec.get("nodes") or {}),
        }
    return {
        **workflow_summary(request, workflow, version.number if version else None),
        "created_at": workflow.created_at,
        "updated_at": workflow.updated_at,
        "latest": latest,
    }


def run_summary(request, run) -> dict:
    return {
        "id": run.pk,
        "url": api_url(request, "run-detail", run.pk),
        "web_url": request.build_absolute_uri(run.get_absolute_url()),
        "workflow": run.workflow.slug,
        "version": run.version.number,
        "status": run.status,
        "finished": run.is_finished,
        "reason": run.reason,
        "trigger": run.trigger,
        "priority": run.priority,
        "params": run.params,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "deadline": run.deadline,
        "duration_seconds": _seconds(run.started_at, run.finished_at),
    }


def run_detail(request, run, nodes) -> dict:
    return {
        **run_summary(request, run),
        "events_url": api_url(request, "run-events", run.pk),
        "checkpoints_url": api_url(request, "run-checkpoints", run.pk),
        "nodes": [node_state(request, run, node) for node in nodes],
    }


def node_state(request, run, node) -> dict:
    return {
        "key": node.node_key,
        "type": node.node_type,
        "status": node.status,
        "attempt": node.attempt,
        "max_attempts": node.max_attempts,
        "queue": node.queue,
        "pool": node.pool,
        "after": node.upstream,
        "reason": node.reason,
        "progress": node.progress,
        "output": node.output,
        "heartbeat_at": node.heartbeat_at,
        "queued_at": node.queued_at,
        "started_at": node.started_at,
        "finished_at": node.finished_at,
        "retry_at": node.retry_at,
        "duration_seconds": _seconds(node.started_at, node.finished_at),
        "attempts_url": api_url(request, "node-attempts", run.pk, node.node_key),
        "logs_url": api_url(request, "node-logs", run.pk, node.node_key),
    }


def attempt(attempt) -> dict:
    return {
        "number": attempt.number,
        "status": attempt.status,
        "queue": attempt.queue,
        "rq_job_id": attempt.rq_job_id,
        "worker": attempt.worker,
        "host": attempt.host,
        "pid": attempt.pid,
        "created_at": attempt.created_at,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "duration_seconds": _seconds(attempt.started_at, attempt.finished_at),
        "error_type": attempt.error_type,
        "error_message": attempt.error_message,
        "traceback": attempt.traceback,
        "cpu_percent": attempt.cpu_percent,
        "rss_bytes": attempt.rss_bytes,
        "io_wait_percent": attempt.io_wait_percent,
    }


def log_line(line) -> dict:
    return {"seq": line.seq, "at": line.at, "level": line.level, "message": line.message}


def event(event) -> dict:
    return {
        "id": event.pk,
        "at": event.at,
        "kind": event.kind,
        "actor": event.actor,
        "reason": event.reason,
        "node": event.node_run.node_key if event.node_run_id else None,
        "before": event.before,
        "after": event.after,
    }


def checkpoint(checkpoint) -> dict:
    return {
        "id": checkpoint.pk,
        "node": checkpoint.node_run.node_key if checkpoint.node_run_id else None,
        "kind": checkpoint.kind,
        "sequence": checkpoint.sequence,
        "attempt": checkpoint.attempt,
        "created_at": checkpoint.created_at,
        "state": checkpoint.state,
    }


def preview(preview) -> dict:
    """operations.Preview, field by field, so the documented shape stays fixed."""
    return {
        "action": preview.action,
        "run_id": preview.run_id,
        "workflow": preview.workflow,
        "version": preview.version,
        "run_status": preview.run_status,
        "noop_message": preview.noop_message,
        "warnings": list(preview.warnings),
        "nodes": [
            {
                "key": node.key,
                "type": node.type,
                "status": node.status,
                "will": node.will,
                "queue": node.queue,
                "pool": node.pool,
                "side_effects": node.side_effects,
                "has_compensate": node.has_compensate,
                "warning": node.warning,
            }
            for node in preview.nodes
        ],
    }
