"""The top of the run page: where the run is, what failed and why (the error once), the
watchdog's finding in plain words, and the one action recommended, the run's other actions
beside it (``summary``); and where an action's preview page is."""

from dataclasses import dataclass
from urllib.parse import quote_plus, urlencode

from django.db.models import F
from django.urls import reverse

from diagnostics import explain
from workflows.models import NodeAttempt, NodeRun, Run


def node_href(key: str) -> str:
    return "?node=" + quote_plus(key)


@dataclass
class RunActions:
    resume: bool
    cancel: bool
    rollback: bool
    why_no_rollback: str


@dataclass
class Failure:
    """The failure that stopped the run, told once: which node, which attempt, the error."""

    node_key: str
    status: str
    attempt: int
    max_attempts: int
    error: str
    href: str


@dataclass
class Summary:
    """The top of the run page: where the run is, what failed and why, the finding in
    plain words, and the one action recommended; the other run actions beside it."""

    headline: str
    failure: Failure | None
    finding: explain.Explanation | None
    other_findings: list
    recommended: dict | None
    other_actions: list[dict]

    @property
    def finding_ids(self) -> set[int]:
        shown = [self.finding, *self.other_findings] if self.finding else self.other_findings
        return {finding.id for finding in shown}


def run_actions(run: Run) -> RunActions:
    active = run.status in Run.ACTIVE
    return RunActions(
        resume=run.status in (Run.Status.FAILED, Run.Status.CANCELLED),
        cancel=active,
        rollback=not active,
        why_no_rollback="Cancel the run first to roll it back." if active else "",
    )


def run_action_links(run: Run) -> list[dict]:
    """The run-level actions open to this run, as links to their preview pages."""
    actions = run_actions(run)
    links = []
    if actions.resume:
        links.append({"label": "Resume run", "href": preview_url("resume", run)})
    if actions.rollback:
        links.append({"label": "Roll back", "href": preview_url("rollback", run)})
    if actions.cancel:
        links.append({"label": "Cancel run", "href": preview_url("cancel", run), "danger": True})
    return links


def preview_url(action: str, run: Run) -> str:
    return reverse(f"dashboard:run-{action}-preview", args=[run.pk])


def first_failure(run: Run, nodes: list[NodeRun]) -> Failure | None:
    """The earliest failed or timed-out node and the error of its last attempt."""
    stopped = (NodeRun.Status.FAILED, NodeRun.Status.TIMED_OUT)
    if not any(node.status in stopped for node in nodes):
        return None
    attempt = (
        NodeAttempt.objects.filter(
            node_run__run=run, node_run__status__in=stopped, number=F("node_run__attempt")
        )
        .select_related("node_run")
        .order_by("node_run__finished_at", "node_run_id")
        .first()
    )
    if attempt is None:
        return None
    node = attempt.node_run
    error = ": ".join(part for part in (attempt.error_type, attempt.error_message) if part)
    return Failure(
        node_key=node.node_key,
        status=node.status,
        attempt=node.attempt - node.attempts_base,
        max_attempts=node.max_attempts,
        error=error or node.reason,
        href=node_href(node.node_key),
    )


def summary(run: Run, nodes: list[NodeRun], diagnosis, now) -> Summary:
    """What the top of the run page says; every value also shown below is left out there."""
    findings = list(diagnosis.findings)
    finding = findings[0] if findings else None
    failure = first_failure(run, nodes)
    links = run_action_links(run)
    recommended = None
    if finding and finding.action:
        recommended = action_link(finding.action)
        if "href" not in recommended and "command" not in recommended:
            recommended = None
    if recommended is None and run.status in (Run.Status.FAILED, Run.Status.CANCELLED):
        recommended = links[0]  # resume: what stopped runs again, the rest goes on
    others = [link for link in links if not recommended or link["href"] != recommended.get("href")]
    return Summary(
        headline=headline(run, nodes, failure, finding, now),
        failure=failure,
        finding=finding,
        other_findings=findings[1:],
        recommended=recommended,
        other_actions=others,
    )


def headline(run: Run, nodes: list[NodeRun], failure, finding, now) -> str:
    never_ran = [node.node_key for node in nodes if node.status == NodeRun.Status.PENDING]
    done = sum(1 for node in nodes if node.status in NodeRun.DONE)
    if run.status == Run.Status.SUCCEEDED:
        took = (run.finished_at - (run.started_at or run.created_at)).total_seconds()
        return f"Succeeded in {explain.duration_words(took)}: all {len(nodes)} nodes done."
    if run.status == Run.Status.CANCELLED:
        return f"Cancelled: {run.reason or 'no reason given'}."
    if run.status == Run.Status.FAILED:
        if failure is None:
            return f"Failed: {run.reason or 'no reason recorded'}."
        words = failure.status.replace("_", " ")
        text = f"{failure.node_key} {words} on attempt {failure.attempt} of {failure.max_attempts}"
        stopped = [
            n for n in nodes if n.status in (NodeRun.Status.FAILED, NodeRun.Status.TIMED_OUT)
        ]
        if len(stopped) > 1:
            text += f" ({len(stopped) - 1} more node{'s' if len(stopped) > 2 else ''} too)"
        if never_ran:
            shown = ", ".join(never_ran[:3]) + (
                f" and {len(never_ran) - 3} more" if len(never_ran) > 3 else ""
            )
            text += f"; {shown} never ran"
        return text + "."
    progress = f"{done} of {len(nodes)} nodes done"
    if finding:
        return f"{run.get_status_display()}, {progress}, but: {finding.title}."
    return f"{run.get_status_display()}: {progress}; nothing looks stuck."


def action_link(action: dict) -> dict:
    """Where the one-click action of a finding leads: the preview page that applies it."""
    kind, run_id = action.get("kind"), action.get("run")
    if kind == "retry_node" and run_id:
        query = urlencode({"node": action.get("node", "")})
        return {
            **action,
            "href": f"{reverse('dashboard:run-retry-preview', args=[run_id])}?{query}",
        }
    if kind == "resume_run" and run_id:
        return {**action, "href": reverse("dashboard:run-resume-preview", args=[run_id])}
    if kind == "resize_pool":
        query = urlencode({"name": action.get("pool", "")})
        return {**action, "href": f"{reverse('admin:workflows_resourcepool_changelist')}?{query}"}
    return action
