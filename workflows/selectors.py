"""Reads for commands and the API: precomputed, with a fixed number of queries."""

import re

from django.db.models import Prefetch, Q

from workflows.models import NodeAttempt, NodeRun, Run, Workflow

# "123" or "#123": a run id; anything else is searched as text.
RUN_ID = re.compile(r"^#?(\d{1,18})$")


def seconds_between(start, end):
    if start and end:
        return (end - start).total_seconds()
    return None


def attempt_words(attempt: int, max_attempts: int, attempts_base: int) -> str:
    """A node's attempt against its limit, counted as retries are: from the last operator
    reset. "2/3"; after a reset, "1/1 (#2)": never "2/1"."""
    counted = f"{max(attempt - attempts_base, 0)}/{max_attempts}"
    return f"{counted} (#{attempt})" if attempts_base else counted


def search_runs(runs, text: str):
    """``runs`` narrowed to what ``text`` finds (case-insensitive): a number is a run id;
    other text matches the workflow's slug or name, the run's reason, or the error type or
    message of any of its attempts. Log lines are not read (the Logs page searches them).

    Cost at 100 000 runs and 1 000 000 attempts: the workflow match reads the few workflow
    rows, then run_workflow_id; the error match reads only the attempts that have an error
    (the attempt_error partial index), once per query; the reason is checked on each run
    the page or its capped count reads. At most ~80 ms of database time per page on
    either database (docs/architecture.md, "Searching runs and logs").
    """
    text = text.strip()
    number = RUN_ID.match(text)
    if number:
        return runs.filter(pk=int(number.group(1)))
    if not text:
        return runs
    workflows = Workflow.objects.filter(Q(slug__icontains=text) | Q(name__icontains=text))
    failed_here = (
        NodeAttempt.objects.exclude(error_type="")
        .filter(Q(error_type__icontains=text) | Q(error_message__icontains=text))
        .values("node_run__run_id")
    )
    return runs.filter(
        Q(workflow__in=workflows.values("pk")) | Q(reason__icontains=text) | Q(pk__in=failed_here)
    )


def run_summary_line(run: Run) -> str:
    took = seconds_between(run.started_at, run.finished_at)
    duration = f" in {took:.1f}s" if took is not None else ""
    return f"run {run.pk} of {run.workflow.slug} v{run.version.number}: {run.status}{duration}"


def run_detail(run: Run) -> dict:
    """A run with its nodes and their attempts, in three queries."""
    nodes = (
        NodeRun.objects.filter(run=run)
        .order_by("id")
        .prefetch_related(Prefetch("attempts", queryset=NodeAttempt.objects.order_by("number")))
    )
    return {
        "id": run.pk,
        "workflow": run.workflow.slug,
        "version": run.version.number,
        "status": run.status,
        "reason": run.reason,
        "params": run.params,
        "trigger": run.trigger,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration_seconds": seconds_between(run.started_at, run.finished_at),
        "nodes": [
            {
                "key": node.node_key,
                "type": node.node_type,
                "status": node.status,
                "attempt": node.attempt,
                "max_attempts": node.max_attempts,
                "attempts_base": node.attempts_base,
                "queue": node.queue,
                "pool": node.pool,
                "after": node.upstream,
                "reason": node.reason,
                "progress": node.progress,
                "heartbeat_at": node.heartbeat_at,
                "started_at": node.started_at,
                "finished_at": node.finished_at,
                "duration_seconds": seconds_between(node.started_at, node.finished_at),
                "output": node.output,
                "attempts": [
                    {
                        "number": attempt.number,
                        "status": attempt.status,
                        "worker": attempt.worker,
                        "host": attempt.host,
                        "pid": attempt.pid,
                        "started_at": attempt.started_at,
                        "finished_at": attempt.finished_at,
                        "duration_seconds": seconds_between(
                            attempt.started_at, attempt.finished_at
                        ),
                        "error_type": attempt.error_type,
                        "error_message": attempt.error_message,
                        "cpu_percent": attempt.cpu_percent,
                        "rss_bytes": attempt.rss_bytes,
                    }
                    for attempt in node.attempts.all()
                ],
            }
            for node in nodes
        ],
    }
