"""The workflow page's release panel and its actions, and uploading a definition.

Each action is a POST form with a reason: the view parses it, calls one function of
workflows.deployments.services (or versioning.load_definition for an upload), says
what happened and redirects to the workflow page. The services check the state under
the workflow's lock and audit every transition; a user without the operate permission
is refused here (403), and the refusal is audited as the services audit theirs.
"""

import difflib
import hashlib
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from dashboard import forms
from dashboard.templatetags.keel import percent, seconds
from workflows import audit, operations
from workflows.definitions import spec, versioning
from workflows.deployments import selectors, services
from workflows.models import AuditEvent, Deployment, Workflow

# As dashboard.views, which imports this module for the workflow page's panel.
VIEW_PERMISSION = "workflows.view_run"

# --- The panel on the workflow page -----------------------------------------------------------

RELEASE_POLL_SECONDS = 5  # the watchdog judges a canary every few seconds
# htmx stops polling when a response has this status (and still swaps it in).
STOP_POLLING = 286
CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 480, 110, 6
RATE_TOPS = (0.1, 0.25, 0.5, 1.0)  # a failure-rate axis ends at the first that fits


@dataclass(frozen=True)
class ChartDot:
    x: str  # formatted here: a template would localise the decimal point
    y: str
    label: str  # the point's tooltip


@dataclass(frozen=True)
class ChartLine:
    version: int
    series: int  # picks the line's colour (deployments.css)
    segments: list[str]  # polyline points, one string per stretch of hours with runs
    dots: list[ChartDot]


@dataclass(frozen=True)
class Chart:
    title: str
    top_value: str  # the value at the top of the axis, formatted
    lines: list[ChartLine]
    start: datetime
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    left: int = CHART_PAD
    top: int = CHART_PAD
    right: int = CHART_WIDTH - CHART_PAD
    bottom: int = CHART_HEIGHT - CHART_PAD


def release_context(workflow: Workflow) -> dict:
    """The release panel's part of the workflow page's context."""
    panel = selectors.release_panel(workflow)
    in_flight = panel.in_flight
    newest = next((n for n in panel.rollback_targets if n > (panel.current or 0)), None)
    return {
        **_status_context(workflow, panel),
        "release_charts": trend_charts(panel.trend) if panel.trend else [],
        "deploy_form": forms.DeployForm(
            prefix="deploy", initial={"version": newest or panel.current, "strategy": "canary"}
        ),
        "promote_form": forms.PromoteForm(
            prefix="promote", initial={"step": in_flight.step if in_flight else 0}
        ),
        "abort_form": forms.DeploymentReasonForm(prefix="abort"),
    }


def _status_context(workflow: Workflow, panel: selectors.ReleasePanel) -> dict:
    """What ``_release_status.html`` needs; its poll names the deployment shown now."""
    url = reverse("dashboard:workflow-release", args=[workflow.slug])
    return {
        "workflow": workflow,
        "release": panel,
        "release_status_url": f"{url}?{urlencode({'shown': _signature(panel.in_flight)})}",
        "release_poll_seconds": RELEASE_POLL_SECONDS,
    }


def _signature(deployment: Deployment | None) -> str:
    """Which deployment is in flight, in which state and step: the page's forms fit it."""
    if deployment is None:
        return ""
    return f"{deployment.pk}:{deployment.state}:{deployment.step}"


@require_GET
def release_status(request, slug):
    """The release panel's state, polled by htmx while a deployment is in flight; 286
    (stop) once the deployment the page was made for has moved on, saying so."""
    workflow = get_object_or_404(Workflow, slug=slug)
    if not request.user.is_authenticated:
        # A redirect to the login page would be swapped into the panel; say it instead.
        context = {"workflow": workflow, "signed_out": True}
        return render(request, "dashboard/_release_status.html", context, status=STOP_POLLING)
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied(f"Seeing workflows needs the {VIEW_PERMISSION} permission.")
    shown = request.GET.get("shown", "")
    panel = selectors.release_panel(workflow, with_trend=False)
    context = _status_context(workflow, panel)
    if _signature(panel.in_flight) != shown:
        context["moved_on"] = _moved_on(shown, panel)
    polling = panel.in_flight is not None and "moved_on" not in context
    return render(
        request,
        "dashboard/_release_status.html",
        context,
        status=200 if polling else STOP_POLLING,
    )


def _moved_on(shown: str, panel: selectors.ReleasePanel) -> str:
    """One sentence: what became of the deployment the page showed."""
    shown_id = shown.split(":", 1)[0]
    earlier = next((d for d in panel.history if str(d.pk) == shown_id), None)
    if earlier is None:
        return "The deployments changed since this page was loaded."
    what = f"v{earlier.version.number} {earlier.get_strategy_display().lower()}"
    if earlier.state == Deployment.State.RAMPING:
        return f"{what} is at step {earlier.step + 1} of {len(earlier.steps)} ({earlier.percent}%) now."
    return f"{what} is {earlier.get_state_display().lower()} now."


def trend_charts(trend: selectors.Trend) -> list[Chart]:
    """Failure rate and p95 duration per hour, one line per version, as SVG geometry."""
    buckets = [b for line in trend.versions for b in line.buckets if b is not None]
    worst = max((b.failure_rate for b in buckets), default=0)
    rate_top = next(top for top in RATE_TOPS if worst <= top)
    slowest = max((b.p95_seconds for b in buckets if b.p95_seconds is not None), default=0)
    p95_top = slowest or 1.0
    return [
        _chart(
            "Failure rate",
            trend,
            lambda b: b.failure_rate / rate_top,
            lambda b: f"{b.failures} of {b.runs} runs failed ({percent(b.failure_rate)})",
            percent(rate_top, 0),
        ),
        _chart(
            "p95 duration",
            trend,
            lambda b: b.p95_seconds / p95_top if b.p95_seconds is not None else None,
            lambda b: f"p95 {seconds(b.p95_seconds)} over {b.runs} runs",
            seconds(p95_top),
        ),
    ]


def _chart(title, trend, height_of, label_of, top_value: str) -> Chart:
    inner_width, inner_height = CHART_WIDTH - 2 * CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD
    step = inner_width / max(trend.hours - 1, 1)
    lines = []
    for series, version in enumerate(trend.versions):
        segments, stretch, dots = [], [], []
        for index, bucket in enumerate(version.buckets):
            height = height_of(bucket) if bucket is not None else None
            if height is None:
                if stretch:
                    segments.append(" ".join(stretch))
                stretch = []
                continue
            x = CHART_PAD + index * step
            y = CHART_PAD + inner_height * (1 - height)
            stretch.append(f"{x:.1f},{y:.1f}")
            label = f"v{version.version} {bucket.hour:%H}:00 — {label_of(bucket)}"
            dots.append(ChartDot(f"{x:.1f}", f"{y:.1f}", label))
        if stretch:
            segments.append(" ".join(stretch))
        lines.append(ChartLine(version.version, series, segments, dots))
    return Chart(title=title, top_value=top_value, lines=lines, start=trend.start)


# --- Actions ----------------------------------------------------------------------------------


def _workflow_for_user(request, slug) -> Workflow:
    """The workflow, or 404; 403 for a user who may not see runs."""
    workflow = get_object_or_404(Workflow, slug=slug)
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied(f"Seeing workflows needs the {VIEW_PERMISSION} permission.")
    return workflow


def _deployment_for_user(request, deployment_id) -> Deployment:
    deployment = get_object_or_404(
        Deployment.objects.select_related("workflow", "version"), pk=deployment_id
    )
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied(f"Seeing workflows needs the {VIEW_PERMISSION} permission.")
    return deployment


def _may_operate(request) -> bool:
    return request.user.has_perm(operations.OPERATE_PERMISSION)


def _refuse(request, target: str, action: str, verb: str):
    """403 for a user who may not operate, audited (rate-limited) as the services do."""
    username = request.user.get_username()
    audit.record_refusal(username, action, target, "", operations.OPERATE_PERMISSION)
    message = (
        f"{username} may not {verb}: ask an administrator for the "
        f"'{operations.OPERATE_PERMISSION}' permission."
    )
    return render(request, "dashboard/denied.html", {"message": message}, status=403)


def _release_url(workflow: Workflow) -> str:
    return f"{workflow.get_absolute_url()}#release"


def _form_errors(form) -> str:
    return " ".join(
        f"{form.fields[name].label or name.replace('_', ' ').capitalize()}: {error}"
        if name != "__all__"
        else str(error)
        for name, errors in form.errors.items()
        for error in errors
    )


def _apply(request, workflow: Workflow, call):
    """Call one service with the user as actor; its message, or its error, goes on the
    workflow page (never a 500)."""
    try:
        change = call(operations.Actor.for_user(request.user))
    except operations.OperationDenied as denied:
        return render(request, "dashboard/denied.html", {"message": str(denied)}, status=403)
    except operations.OperationError as problem:
        messages.error(request, str(problem))
    else:
        (messages.success if change.changed else messages.info)(request, change.message)
    return redirect(_release_url(workflow))


@require_POST
@login_required
def deploy(request, slug):
    workflow = _workflow_for_user(request, slug)
    if not _may_operate(request):
        return _refuse(request, f"workflow:{slug}", AuditEvent.Action.DEPLOY, f"deploy {slug}")
    form = forms.DeployForm(request.POST, prefix="deploy")
    if not form.is_valid():
        messages.error(request, f"Nothing deployed. {_form_errors(form)}")
        return redirect(_release_url(workflow))
    data = form.cleaned_data
    version = workflow.versions.filter(number=data["version"]).first()
    if version is None:
        messages.error(request, f"{slug} has no version {data['version']}: nothing deployed.")
        return redirect(_release_url(workflow))
    canary = data["strategy"] == Deployment.Strategy.CANARY
    return _apply(
        request,
        workflow,
        lambda actor: services.deploy(
            version,
            actor=actor,
            reason=data["reason"],
            strategy=data["strategy"],
            steps=data["steps"] if canary else None,
            min_runs=data["min_runs"] if canary else None,
        ),
    )


@require_POST
@login_required
def promote(request, deployment_id):
    deployment = _deployment_for_user(request, deployment_id)
    workflow = deployment.workflow
    if not _may_operate(request):
        return _refuse(
            request,
            f"workflow:{workflow.slug}",
            AuditEvent.Action.PROMOTE_DEPLOYMENT,
            f"promote a deployment of {workflow.slug}",
        )
    form = forms.PromoteForm(request.POST, prefix="promote")
    if not form.is_valid():
        messages.error(request, f"Not promoted. {_form_errors(form)}")
        return redirect(_release_url(workflow))
    return _apply(
        request,
        workflow,
        lambda actor: _promote_once(
            deployment.pk,
            form.cleaned_data["step"],
            actor=actor,
            reason=form.cleaned_data["reason"],
        ),
    )


def _promote_once(deployment_id: int, seen_step: int, *, actor, reason: str) -> services.Change:
    """Promote only from the step the operator saw: a form submitted twice promotes once."""
    return services.promote(deployment_id, actor=actor, reason=reason, expected_step=seen_step)


@require_POST
@login_required
def abort(request, deployment_id):
    deployment = _deployment_for_user(request, deployment_id)
    workflow = deployment.workflow
    if not _may_operate(request):
        return _refuse(
            request,
            f"workflow:{workflow.slug}",
            AuditEvent.Action.ABORT_DEPLOYMENT,
            f"abort a deployment of {workflow.slug}",
        )
    form = forms.DeploymentReasonForm(request.POST, prefix="abort")
    if not form.is_valid():
        messages.error(request, f"Not aborted. {_form_errors(form)}")
        return redirect(_release_url(workflow))
    return _apply(
        request,
        workflow,
        lambda actor: services.abort(
            deployment.pk, actor=actor, reason=form.cleaned_data["reason"]
        ),
    )


def _rollback_page(request, workflow: Workflow, to: int | None, form, *, status=200, error=""):
    """What rolling back to version ``to`` changes, and the form that confirms it."""
    preview = None
    if to is not None and not error:
        try:
            preview = services.preview_rollback(workflow, to)
        except operations.OperationError as problem:
            error = str(problem)
    context = {
        "workflow": workflow,
        "to": to,
        "preview": preview,
        "form": form,
        "error": error,
        "now": selectors.new_runs_now(workflow),
        "numbers": list(workflow.versions.order_by("-number").values_list("number", flat=True)),
        "may_operate": _may_operate(request),
        "permission": operations.OPERATE_PERMISSION,
    }
    return render(request, "dashboard/deployment_rollback.html", context, status=status)


def _version_number(value) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


@require_GET
@login_required
def rollback_preview(request, slug):
    workflow = _workflow_for_user(request, slug)
    to = _version_number(request.GET.get("to"))
    form = forms.RollbackVersionForm(prefix="rollback", initial={"to": to, "runs": "finish"})
    return _rollback_page(request, workflow, to, form)


@require_POST
@login_required
def rollback(request, slug):
    workflow = _workflow_for_user(request, slug)
    if not _may_operate(request):
        return _refuse(
            request,
            f"workflow:{slug}",
            AuditEvent.Action.ROLLBACK_VERSION,
            f"roll back a version of {slug}",
        )
    form = forms.RollbackVersionForm(request.POST, prefix="rollback")
    if not form.is_valid():
        to = _version_number(request.POST.get("rollback-to"))
        return _rollback_page(request, workflow, to, form, status=400)
    data = form.cleaned_data
    try:
        change = services.rollback_version(
            workflow,
            data["to"],
            actor=operations.Actor.for_user(request.user),
            reason=data["reason"],
            runs=data["runs"],
        )
    except operations.OperationDenied as denied:
        return render(request, "dashboard/denied.html", {"message": str(denied)}, status=403)
    except operations.OperationError as problem:
        return _rollback_page(request, workflow, data["to"], form, status=400, error=str(problem))
    (messages.success if change.changed else messages.info)(request, change.message)
    return redirect(_release_url(workflow))


@require_http_methods(["GET", "POST"])
@login_required
def runs_left(request, slug, number):
    """The unfinished runs of a version new runs no longer get (a finding links here), and
    the form that restarts them on the live version or cancels them."""
    workflow = _workflow_for_user(request, slug)
    if request.method == "GET":
        return _runs_left_page(request, workflow, number, forms.MoveRunsForm(prefix="move"))
    if not _may_operate(request):
        return _refuse(
            request,
            f"workflow:{slug}",
            AuditEvent.Action.MOVE_RUNS_OFF,
            f"move runs off a version of {slug}",
        )
    form = forms.MoveRunsForm(request.POST, prefix="move")
    if not form.is_valid():
        return _runs_left_page(request, workflow, number, form, status=400)
    try:
        change = services.move_runs_off(
            workflow,
            number,
            actor=operations.Actor.for_user(request.user),
            reason=form.cleaned_data["reason"],
            runs=form.cleaned_data["runs"],
        )
    except operations.OperationDenied as denied:
        return render(request, "dashboard/denied.html", {"message": str(denied)}, status=403)
    except operations.OperationError as problem:
        return _runs_left_page(request, workflow, number, form, status=400, error=str(problem))
    (messages.success if change.changed else messages.info)(request, change.message)
    return redirect(_release_url(workflow))


def _runs_left_page(request, workflow: Workflow, number: int, form, *, status=200, error=""):
    preview = None
    try:
        preview = services.preview_runs_left(workflow, number)
    except operations.OperationError as problem:
        error, status = error or str(problem), 404
    context = {
        "workflow": workflow,
        "number": number,
        "preview": preview,
        "form": form,
        "error": error,
        "may_operate": _may_operate(request),
        "permission": operations.OPERATE_PERMISSION,
    }
    return render(request, "dashboard/version_runs_left.html", context, status=status)


# --- Uploading a definition -------------------------------------------------------------------


@dataclass(frozen=True)
class UploadCheck:
    """A valid definition and how it differs from the live version of its workflow."""

    slug: str
    workflow: Workflow | None  # None: a new workflow
    live_number: int | None
    diff: list[tuple[str, str]]  # (kind, line): "hunk", "added", "removed", "context", "file"
    same_as_latest: int | None  # the latest version's number, when the content is the same
    declared_deploy: dict


def _check(definition: spec.Definition) -> UploadCheck:
    workflow = Workflow.objects.filter(slug=definition.slug).first()
    live = selectors.live_version(workflow) if workflow else None
    diff = []
    if live is not None:
        lines = difflib.unified_diff(
            live.source.splitlines(),
            definition.source.splitlines(),
            fromfile=f"v{live.number} (live)",
            tofile="uploaded",
            lineterm="",
        )
        kinds = {"@": "hunk", "+": "added", "-": "removed"}
        for number, line in enumerate(lines):
            kind = "file" if number < 2 else kinds.get(line[:1], "context")
            diff.append((kind, line))
    latest = workflow.versions.order_by("-number").first() if workflow else None
    return UploadCheck(
        slug=definition.slug,
        workflow=workflow,
        live_number=live.number if live else None,
        diff=diff,
        same_as_latest=latest.number if latest and latest.checksum == definition.checksum else None,
        declared_deploy=definition.spec.get("deploy") or {},
    )


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


@require_http_methods(["GET", "POST"])
@login_required
def upload(request):
    """Paste or choose a definition; Check validates it and shows its diff against the
    live version; Load and deploy stores it (load_definition) and deploys it."""
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied(f"Seeing workflows needs the {VIEW_PERMISSION} permission.")
    context = {"may_operate": _may_operate(request), "permission": operations.OPERATE_PERMISSION}
    if request.method == "GET":
        workflow = Workflow.objects.filter(slug=request.GET.get("workflow", "")).first()
        live = selectors.live_version(workflow) if workflow else None
        initial = {"source": live.source if live else ""}
        form = forms.UploadDefinitionForm(initial=initial)
        return render(request, "dashboard/upload.html", {**context, "form": form})
    if not context["may_operate"]:
        return _refuse(request, "definition:upload", AuditEvent.Action.DEPLOY, "load definitions")
    form = forms.UploadDefinitionForm(request.POST, request.FILES)
    if not form.is_valid():
        return render(request, "dashboard/upload.html", {**context, "form": form}, status=400)
    data = form.cleaned_data
    source, digest = data["source"], _digest(data["source"])
    # Re-shown with the text in the textarea (a chosen file is read once) and its digest.
    shown = forms.UploadDefinitionForm(
        initial={**data, "file": None, "source": source, "checked": digest}
    )
    context["form"] = shown
    try:
        definition = spec.parse(source, source_name="the definition")
    except spec.DefinitionError as error:
        context["problems"] = error.problems
        return render(request, "dashboard/upload.html", context, status=400)
    context["check"] = _check(definition)
    if "load" not in request.POST:
        return render(request, "dashboard/upload.html", context)
    if data["checked"] != digest:
        context["error"] = (
            "The definition changed since it was checked: check this one, then load it."
        )
        return render(request, "dashboard/upload.html", context, status=400)
    if not data["reason"].strip():
        context["error"] = (
            "Say why you load it: the reason is kept with the version and in the audit."
        )
        return render(request, "dashboard/upload.html", context, status=400)
    try:
        result = versioning.load_definition(
            source,
            actor=request.user.get_username(),
            source_name="a dashboard upload",
            note=data["reason"].strip(),
            deploy=None if data["deploy"] == "none" else data["deploy"],
        )
    except spec.DefinitionError as error:
        context["problems"] = error.problems
        return render(request, "dashboard/upload.html", context, status=400)
    except operations.OperationError as problem:
        context["error"] = f"Nothing loaded: {problem}"
        return render(request, "dashboard/upload.html", context, status=400)
    (messages.success if result.created else messages.info)(request, f"{result}.")
    return redirect(_release_url(result.version.workflow))
