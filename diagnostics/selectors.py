"""Reads of findings for the pages, the system report and commands."""

import json
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import urlencode

from django.db.models import Case, Count, F, IntegerField, Value, When, Window
from django.db.models.functions import RowNumber
from django.urls import NoReverseMatch, reverse

from diagnostics.models import Finding, FindingSeverity
from diagnostics.reliability import format_duration
from workflows import actions

SEVERITY_RANK = {FindingSeverity.CRITICAL: 0, FindingSeverity.WARNING: 1, FindingSeverity.INFO: 2}
# How many findings of one cause the "Stuck & findings" page shows (with the cause's count):
# each costs about a third of a millisecond to render.
SHOWN_PER_CAUSE = 25
# A finding's suggested action (as detectors write it) -> the registered action whose
# preview page it links to (the operator confirms there, with a reason).
RUN_PAGE_ACTIONS = {
    "retry_node": "retry",
    "resume_run": "resume",
    "retry_run": "resume",
    "cancel_run": "cancel",
    "rollback_run": "rollback",
    "skip_node": "skip",
}


def _severity_order():
    return Case(
        *[When(severity=severity, then=Value(rank)) for severity, rank in SEVERITY_RANK.items()],
        default=Value(9),
        output_field=IntegerField(),
    )


def open_findings(limit: int = 500):
    """Open findings, grouped by code, worst first; two queries whatever their number."""
    return list(
        Finding.objects.filter(resolved_at__isnull=True)
        .select_related("run__workflow", "node_run")
        .annotate(severity_rank=_severity_order())
        .order_by("code", "severity_rank", "first_seen", "id")[:limit]
    )


def describe_action(action: dict, run_id: int | None) -> dict | None:
    """How the page offers a finding's one-click action.

    Run and node actions are done from the run page (workflows operations); a command is
    shown to copy; a link is followed only if it stays on this site.
    """
    if not action:
        return None
    kind = str(action.get("kind", ""))
    label = str(action.get("label") or kind.replace("_", " ").capitalize() or "Action")
    # The detectors write {"kind": "retry_node", "run": 12, "node": "load"}.
    run_id = action.get("run") or action.get("run_id") or run_id
    if kind in RUN_PAGE_ACTIONS and str(run_id).isdigit():
        node = action.get("node")
        slug = actions.get(RUN_PAGE_ACTIONS[kind]).slug
        url = reverse(f"dashboard:run-{slug}-preview", args=[int(run_id)])
        return {
            "kind": kind,
            "label": f"{label} ({node})…" if node else f"{label}…",
            "url": f"{url}?{urlencode({'node': node})}" if node else url,
        }
    if kind == "move_runs_off" and str(action.get("version")).isdigit():
        try:
            url = reverse(
                "dashboard:workflow-version-runs-left",
                args=[str(action.get("workflow")), int(action["version"])],
            )
        except NoReverseMatch:  # not a slug: the command below still says what to do
            pass
        else:
            return {"kind": kind, "label": f"{label}…", "url": url}
    if action.get("command"):
        return {"kind": kind or "command", "label": label, "command": str(action["command"])}
    if kind in {"raise_pool", "resize_pool"} and action.get("pool"):
        url = reverse("admin:workflows_resourcepool_changelist")
        return {"kind": kind, "label": label, "url": f"{url}?{urlencode({'q': action['pool']})}"}
    url = str(action.get("url") or "")
    if url.startswith("/") and not url.startswith("//"):
        return {"kind": kind, "label": label, "url": url}
    return {"kind": kind, "label": label}


def _evidence_items(evidence) -> list[dict]:
    """Evidence as rows to show: scalars inline, lists and mappings as indented JSON."""
    if not isinstance(evidence, dict):
        evidence = {"evidence": evidence}
    items = []
    for key, value in evidence.items():
        if isinstance(value, dict | list):
            items.append(
                {"key": str(key), "value": json.dumps(value, indent=2, default=str), "block": True}
            )
        else:
            items.append({"key": str(key), "value": "" if value is None else value, "block": False})
    return items


def _finding_row(finding: Finding, now: datetime) -> dict:
    run = finding.run
    open_seconds = max(0.0, (now - finding.first_seen).total_seconds())
    return {
        "id": finding.pk,
        "code": finding.code,
        "severity": finding.severity,
        "subject": finding.subject,
        "title": finding.title,
        "suggestion": finding.suggestion,
        "evidence": finding.evidence,
        "evidence_items": _evidence_items(finding.evidence),
        "action": describe_action(finding.action or {}, finding.run_id),
        "repair": finding.repair,
        "repaired_at": finding.repaired_at,
        "first_seen": finding.first_seen,
        "last_seen": finding.last_seen,
        "open_seconds": round(open_seconds, 1),
        "open_for": format_duration(open_seconds),
        "run_id": finding.run_id,
        "run_url": run.get_absolute_url() if run else "",
        "workflow": run.workflow.slug if run else "",
        "node_key": finding.node_run.node_key if finding.node_run else "",
        "queue": finding.queue,
        "worker": finding.worker,
    }


def open_findings_per_cause(per_cause: int):
    """The first ``per_cause`` open findings of each cause (worst, then oldest first), in
    the order of open_findings(); two queries whatever the number of open findings.

    The ids come first, on their own: joined to the rows in one statement, PostgreSQL
    expects every open finding back from the ranking and joins them all.
    """
    ranked = (
        Finding.objects.filter(resolved_at__isnull=True)
        .annotate(
            place=Window(
                RowNumber(),
                partition_by=F("code"),
                order_by=[_severity_order().asc(), F("first_seen").asc(), F("id").asc()],
            )
        )
        .filter(place__lte=per_cause)
        .values_list("pk", flat=True)
    )
    return list(
        Finding.objects.filter(pk__in=list(ranked))
        .select_related("run__workflow", "node_run")
        .annotate(severity_rank=_severity_order())
        .order_by("code", "severity_rank", "first_seen", "id")
    )


def _open_counts() -> list[tuple[str, str, int]]:
    """(code, severity, how many) over every open finding."""
    return list(
        Finding.objects.filter(resolved_at__isnull=True)
        .values_list("code", "severity")
        .annotate(count=Count("id"))
        .order_by()
    )


def findings_by_cause(per_cause: int = SHOWN_PER_CAUSE) -> dict:
    """The "Stuck & findings" page: open findings grouped by cause, worst cause first.

    Each cause has its full count and shows its first ``per_cause`` findings: in a mass
    incident one cause can hold thousands, and it must not hide the others.
    """
    now = datetime.now(UTC)
    counts: dict[str, Counter] = {}
    for code, severity, count in _open_counts():
        counts.setdefault(code, Counter())[severity] += count
    rows: dict[str, list[dict]] = {}
    for finding in open_findings_per_cause(per_cause):
        rows.setdefault(finding.code, []).append(_finding_row(finding, now))
    groups = [
        {
            "code": code,
            "count": sum(by_severity.values()),
            "severity": min(by_severity, key=lambda s: SEVERITY_RANK.get(s, 9)),
            "findings": rows.get(code, []),
        }
        for code, by_severity in sorted(counts.items())
    ]
    for group in groups:
        group["hidden"] = max(group["count"] - len(group["findings"]), 0)
    groups.sort(key=lambda group: (SEVERITY_RANK.get(group["severity"], 9), -group["count"]))
    return {
        "groups": groups,
        "total": sum(group["count"] for group in groups),
        "per_cause": per_cause,
        "truncated": any(group["hidden"] > 0 for group in groups),
    }


def findings_summary(limit: int = 100) -> dict:
    """Open findings for the report: counts by code and severity, and the list (bounded)."""
    by_code = Counter()
    by_severity = Counter()
    for code, severity, count in (
        Finding.objects.filter(resolved_at__isnull=True)
        .values_list("code", "severity")
        .annotate(count=Count("id"))
        .order_by()
    ):
        by_code[code] += count
        by_severity[severity] += count
    now = datetime.now(UTC)
    rows = [_finding_row(finding, now) for finding in open_findings(limit)]
    return {
        "open": sum(by_code.values()),
        "by_code": dict(sorted(by_code.items())),
        "by_severity": dict(by_severity),
        "findings": rows,
    }


def latest_open(*, run=None, limit: int = 20) -> list[Finding]:
    """Open findings, newest first (a run's, or all): the pages' stuck-nodes slot.

    Newest by id (findings are inserted as they open): the primary key walks backwards to
    the first ``limit`` open ones, where ordering by ``first_seen`` sorted every open one
    (10 000 in a mass incident: 90 ms)."""
    findings = Finding.objects.filter(resolved_at__isnull=True)
    if run is not None:
        findings = findings.filter(run=run)
    return list(findings.select_related("run__workflow", "node_run").order_by("-id")[:limit])
