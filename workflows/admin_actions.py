"""Admin actions that call operator operations: preview, reason, confirm, audit.

Each action first shows an intermediate page with the preview of every selected
object and a required reason; only the confirm POST calls the operation. A request
key in the form (for deployments, the state the page showed) makes a double submit
change nothing twice.
"""

import json
import uuid
from dataclasses import dataclass

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.template.response import TemplateResponse
from django.utils.html import format_html, format_html_join

from workflows import actions, operations
from workflows.deployments import services
from workflows.models import Deployment


class ReasonForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2, "cols": 80}), max_length=2000)
    request_key = forms.CharField(widget=forms.HiddenInput, max_length=60)


@dataclass(frozen=True)
class Target:
    label: str
    run_id: int
    options: dict  # for operations.preview and the operation


def _about(target: Target, said) -> str:
    """What an operation said, led by its target unless it names it already ("Run 14
    resumed: …", not "run 14: Run 14 resumed: …")."""
    text = str(said)
    return text if text.lower().startswith(target.label.lower()) else f"{target.label}: {text}"


def operate(modeladmin, request, queryset, *, action: str, title: str, targets: list[Target]):
    """Show previews and a reason form; on confirm, perform the registry's ``action`` on
    each target, with its options."""
    registered = actions.get(action)
    if "apply" in request.POST:
        form = ReasonForm(request.POST)
        if form.is_valid():
            actor = operations.Actor.for_user(request.user)
            for target in targets:
                key = f"{form.cleaned_data['request_key']}:{target.run_id}:{target.label}"
                try:
                    outcome = registered.perform(
                        target.run_id,
                        actor=actor,
                        reason=form.cleaned_data["reason"],
                        request_key=key,
                        **target.options,
                    )
                except operations.OperationError as error:
                    modeladmin.message_user(request, _about(target, error), messages.ERROR)
                else:
                    level = messages.SUCCESS if outcome.changed else messages.INFO
                    modeladmin.message_user(request, _about(target, outcome.message), level)
            return None
    else:
        form = ReasonForm(initial={"request_key": uuid.uuid4().hex})
    previews = []
    for target in targets:
        try:
            previews.append((target, registered.preview(target.run_id, **target.options), ""))
        except operations.OperationError as error:
            previews.append((target, None, str(error)))
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "opts": modeladmin.model._meta,
        "queryset": queryset,
        "previews": previews,
        "form": form,
        "action_name": request.POST.get("action"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/workflows/confirm_operation.html", context)


class OperateRunsMixin:
    """Gives a ModelAdmin the ``operate`` permission used by ``@admin.action``."""

    def has_operate_permission(self, request):
        return request.user.has_perm(operations.OPERATE_PERMISSION)


@admin.action(permissions=["operate"], description="Resume selected runs…")
def resume_runs(modeladmin, request, queryset):
    targets = [Target(f"run {run.pk}", run.pk, {}) for run in queryset]
    return operate(
        modeladmin,
        request,
        queryset,
        action="resume",
        title="Resume runs",
        targets=targets,
    )


@admin.action(permissions=["operate"], description="Cancel selected runs…")
def cancel_runs(modeladmin, request, queryset):
    targets = [Target(f"run {run.pk}", run.pk, {}) for run in queryset]
    return operate(
        modeladmin,
        request,
        queryset,
        action="cancel",
        title="Cancel runs",
        targets=targets,
    )


def _node_targets(queryset, **options) -> list[Target]:
    return [
        Target(
            f"run {node.run_id} node {node.node_key}",
            node.run_id,
            {"node": node.node_key, **options},
        )
        for node in queryset
    ]


@admin.action(permissions=["operate"], description="Retry selected nodes…")
def retry_nodes(modeladmin, request, queryset):
    return _retry(modeladmin, request, queryset, downstream=False)


@admin.action(
    permissions=["operate"], description="Retry selected nodes and reset their downstream…"
)
def retry_nodes_with_downstream(modeladmin, request, queryset):
    return _retry(modeladmin, request, queryset, downstream=True)


def _retry(modeladmin, request, queryset, *, downstream: bool):
    return operate(
        modeladmin,
        request,
        queryset,
        action="retry",
        title="Retry nodes" + (" and their downstream" if downstream else ""),
        targets=_node_targets(queryset, downstream=downstream),
    )


@admin.action(permissions=["operate"], description="Skip selected nodes…")
def skip_nodes(modeladmin, request, queryset):
    return operate(
        modeladmin,
        request,
        queryset,
        action="skip",
        title="Skip nodes",
        targets=_node_targets(queryset),
    )


@admin.action(permissions=["operate"], description="Stop selected running nodes (no retry)…")
def stop_nodes(modeladmin, request, queryset):
    # Each at the attempt seen when selected: one that moved on meanwhile is left alone.
    targets = [
        Target(
            f"run {node.run_id} node {node.node_key}",
            node.run_id,
            {"node": node.node_key, "expected_attempt": node.attempt},
        )
        for node in queryset
    ]
    return operate(
        modeladmin, request, queryset, action="stop_node", title="Stop nodes", targets=targets
    )


@admin.action(permissions=["operate"], description="Roll back to just before the selected node…")
def rollback_to_node(modeladmin, request, queryset):
    targets = [
        Target(f"run {node.run_id} node {node.node_key}", node.run_id, {"to_node": node.node_key})
        for node in queryset
    ]
    return operate(
        modeladmin,
        request,
        queryset,
        action="rollback",
        title="Roll back runs",
        targets=targets,
    )


@admin.action(permissions=["operate"], description="Roll back its run to the selected checkpoint…")
def rollback_to_checkpoint(modeladmin, request, queryset):
    checkpoints = list(queryset.select_related("node_run").order_by("run_id", "pk"))
    runs = [checkpoint.run_id for checkpoint in checkpoints]
    if len(set(runs)) != len(runs):
        modeladmin.message_user(
            request,
            "Select one checkpoint per run: a run is rolled back to one checkpoint.",
            messages.ERROR,
        )
        return None
    targets = [
        Target(
            f"run {checkpoint.run_id} checkpoint {checkpoint.pk} ("
            + (f"node {checkpoint.node_run.node_key}, " if checkpoint.node_run else "")
            + f"{checkpoint.kind} #{checkpoint.sequence})",
            checkpoint.run_id,
            {"to_checkpoint": checkpoint.pk},
        )
        for checkpoint in checkpoints
    ]
    return operate(
        modeladmin,
        request,
        queryset,
        action="rollback",
        title="Roll back runs to checkpoints",
        targets=targets,
    )


# --- Deployments ------------------------------------------------------------------------------


class DeploymentReasonForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2, "cols": 80}), max_length=2000)
    # "id:state:step" of each deployment as the page showed it: a promote applies only to a
    # deployment still there, so a double submit cannot skip a canary step.
    seen = forms.CharField(widget=forms.HiddenInput)


def evidence_html(evidence: dict) -> str:
    """A deployment's last analysis, readable: the canary against the baseline (finished
    runs, failures, p95), the p-values and the verdict; a validation run's outcome."""
    if not evidence:
        return "—"
    if "canary" in evidence:
        samples = format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    name,
                    sample.get("runs"),
                    sample.get("failures"),
                    _number(sample.get("failure_rate"), "{:.1%}"),
                    _number(sample.get("p95_seconds"), "{:.1f} s"),
                )
                for name, sample in (
                    ("canary", evidence["canary"]),
                    ("baseline", evidence.get("baseline") or {}),
                )
            ),
        )
        return format_html(
            "<p><strong>{}</strong>: {}</p><table><thead><tr><th></th><th>finished runs</th>"
            "<th>failed</th><th>failure rate</th><th>p95 duration</th></tr></thead>"
            "<tbody>{}</tbody></table><p>Fisher's exact p = {}, Mann-Whitney U p = {} "
            "(significant below {}); step {} at {}%, judged once the canary had {} finished "
            "runs.</p>",
            evidence.get("verdict", "—"),
            evidence.get("reason", ""),
            samples,
            _number(evidence.get("fisher_p"), "{:.3g}"),
            _number(evidence.get("mann_whitney_p"), "{:.3g}"),
            evidence.get("alpha", "—"),
            _number(evidence.get("step"), "{}", offset=1),
            evidence.get("percent", "—"),
            evidence.get("min_runs", "—"),
        )
    if "validation_run" in evidence:
        return format_html(
            "Validation run {}: {}{}",
            evidence["validation_run"],
            evidence.get("status", "—"),
            f" ({evidence['run_reason']})" if evidence.get("run_reason") else "",
        )
    return format_html("<pre>{}</pre>", json.dumps(evidence, indent=2, sort_keys=True))


def _number(value, template: str, offset: int = 0) -> str:
    return "—" if value is None else template.format(value + offset)


def _seen(deployment) -> str:
    return f"{deployment.pk}:{deployment.state}:{deployment.step}"


def _will(deployment, action: str) -> str:
    """What promoting or aborting ``deployment`` does, in words."""
    if deployment.state not in Deployment.IN_FLIGHT:
        return f"Nothing to {action}: it is {deployment.state}."
    baseline = f"v{deployment.baseline.number}" if deployment.baseline_id else "the live version"
    if action == "abort":
        cancelled = (
            f"; its validation run {deployment.validation_run_id} is cancelled if still going"
            if deployment.validation_run_id
            else ""
        )
        return (
            f"New runs get {baseline} again; runs already on v{deployment.version.number} "
            f"finish on it{cancelled}."
        )
    if deployment.state == Deployment.State.RAMPING and deployment.step + 1 < len(deployment.steps):
        following = deployment.step + 1
        return (
            f"From {deployment.percent}% to {deployment.steps[following]}% of new runs (step "
            f"{following + 1} of {len(deployment.steps)}), without waiting for the analysis."
        )
    return f"v{deployment.version.number} becomes the live version: every new run gets it."


def _deployment_action(modeladmin, request, queryset, *, action: str, title: str):
    """Show what ``action`` (promote or abort) does to each selected deployment and ask for
    a reason; on confirm, call the deployment service for each."""
    deployments = list(
        queryset.select_related("workflow", "version", "baseline").defer(
            "version__spec", "version__source", "baseline__spec", "baseline__source"
        )
    )
    if "apply" in request.POST:
        form = DeploymentReasonForm(request.POST)
        if form.is_valid():
            _apply_to_deployments(modeladmin, request, deployments, action, form.cleaned_data)
            return None
    else:
        form = DeploymentReasonForm(initial={"seen": ",".join(map(_seen, deployments))})
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "opts": modeladmin.model._meta,
        "queryset": deployments,
        "rows": [
            (deployment, _will(deployment, action), evidence_html(deployment.evidence))
            for deployment in deployments
        ],
        "form": form,
        "action_name": request.POST.get("action"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/workflows/confirm_deployment.html", context)


def _apply_to_deployments(modeladmin, request, deployments, action: str, cleaned: dict) -> None:
    actor = operations.Actor.for_user(request.user)
    seen = set(cleaned["seen"].split(","))
    for deployment in deployments:
        label = (
            f"Deployment {deployment.pk} ({deployment.workflow.slug} v{deployment.version.number})"
        )
        try:
            if action == "abort":
                change = services.abort(deployment.pk, actor=actor, reason=cleaned["reason"])
            else:
                current = Deployment.objects.filter(pk=deployment.pk).first()
                if current is None or _seen(current) not in seen:
                    modeladmin.message_user(
                        request,
                        f"{label} changed since the page showed it (now {current.state}, "
                        f"{current.percent}%): nothing done; look again before promoting."
                        if current
                        else f"{label} no longer exists.",
                        messages.INFO,
                    )
                    continue
                # From the step the page showed, checked again under the service's lock.
                change = services.promote(
                    deployment.pk,
                    actor=actor,
                    reason=cleaned["reason"],
                    expected_step=current.step,
                )
        except operations.OperationError as error:
            modeladmin.message_user(request, f"{label}: {error}", messages.ERROR)
        else:
            level = messages.SUCCESS if change.changed else messages.INFO
            modeladmin.message_user(request, change.message, level)


@admin.action(permissions=["operate"], description="Promote selected deployments…")
def promote_deployments(modeladmin, request, queryset):
    return _deployment_action(
        modeladmin, request, queryset, action="promote", title="Promote deployments"
    )


@admin.action(permissions=["operate"], description="Abort selected deployments…")
def abort_deployments(modeladmin, request, queryset):
    return _deployment_action(
        modeladmin, request, queryset, action="abort", title="Abort deployments"
    )


RUN_POLICY_CHOICES = [
    ("finish", "finish: they end on the version they started on"),
    ("cancel", "cancel the running and queued ones"),
    ("restart", "restart: cancel them, then start them again on the chosen version"),
]
assert [value for value, _ in RUN_POLICY_CHOICES] == list(services.RUN_POLICIES)
MAX_VERSIONS_OFFERED = 100


class RollbackForm(forms.Form):
    version = forms.TypedChoiceField(coerce=int, help_text="New runs get this version at once.")
    runs = forms.ChoiceField(
        choices=RUN_POLICY_CHOICES,
        initial="finish",
        widget=forms.RadioSelect,
        label="Runs on the versions left",
    )
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 80}), max_length=2000, required=False
    )
    # The version whose preview the page showed: confirming applies only that one.
    previewed = forms.IntegerField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args, versions: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["version"].choices = [(n, f"v{n}") for n in versions]


@admin.action(permissions=["operate"], description="Roll back to a version…")
def rollback_to_version(modeladmin, request, queryset):
    """Choose a version and what happens to the runs left, see the preview of that choice,
    then confirm with a reason: services.rollback_version."""
    workflows = list(queryset[:2])
    if len(workflows) != 1:
        modeladmin.message_user(
            request, "Select one workflow: a rollback is for one workflow.", messages.ERROR
        )
        return None
    workflow = workflows[0]
    versions = list(
        workflow.versions.order_by("-number").values_list("number", flat=True)[
            :MAX_VERSIONS_OFFERED
        ]
    )
    note = ""
    if "version" in request.POST:
        form = RollbackForm(request.POST, versions=versions)
        chosen = form.cleaned_data["version"] if form.is_valid() else None
        if chosen is not None and "apply" in request.POST:
            if form.cleaned_data["previewed"] != chosen:
                note = f"Check the preview for v{chosen}, then confirm."
            elif not form.cleaned_data["reason"].strip():
                form.add_error("reason", "Give a reason: it is kept in the audit.")
            else:
                _roll_back(modeladmin, request, workflow, chosen, form.cleaned_data)
                return None
    else:
        form = RollbackForm(
            initial={"version": _previous_version(workflow, versions)}, versions=versions
        )
        chosen = form.initial["version"]
    preview = services.preview_rollback(workflow, chosen) if chosen is not None else None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"Roll back {workflow.slug} to a version",
        "opts": modeladmin.model._meta,
        "workflow": workflow,
        "preview": preview,
        "note": note,
        "form": form,
        "action_name": request.POST.get("action"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/workflows/rollback_version.html", context)


def _previous_version(workflow, versions: list[int]) -> int | None:
    """The version live before the current one, else the newest: what a rollback is for."""
    before = (
        Deployment.objects.filter(workflow=workflow, state=Deployment.State.ACTIVE)
        .values_list("baseline__number", flat=True)
        .first()
    )
    return before or (versions[0] if versions else None)


def _roll_back(modeladmin, request, workflow, number: int, cleaned: dict) -> None:
    try:
        change = services.rollback_version(
            workflow,
            number,
            actor=operations.Actor.for_user(request.user),
            reason=cleaned["reason"],
            runs=cleaned["runs"],
        )
    except operations.OperationError as error:
        modeladmin.message_user(request, f"{workflow.slug}: {error}", messages.ERROR)
    else:
        level = messages.SUCCESS if change.changed else messages.INFO
        modeladmin.message_user(request, change.message, level)


class MoveRunsForm(forms.Form):
    runs = forms.ChoiceField(
        choices=[
            ("restart", "cancel them and start them again on the live version"),
            ("cancel", "cancel them"),
        ],
        initial="restart",
        widget=forms.RadioSelect,
        label="Its unfinished runs",
    )
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 80}), max_length=2000, required=False
    )


@admin.action(permissions=["operate"], description="Restart or cancel its runs left…")
def move_runs_off(modeladmin, request, queryset):
    """The unfinished runs of one version new runs no longer get: the preview, then
    confirmed with a reason, services.move_runs_off."""
    versions = list(queryset.select_related("workflow")[:2])
    if len(versions) != 1:
        modeladmin.message_user(
            request, "Select one version: its runs are moved on their own.", messages.ERROR
        )
        return None
    version = versions[0]
    workflow = version.workflow
    form = MoveRunsForm(request.POST if "apply" in request.POST else None)
    if "apply" in request.POST and form.is_valid():
        if not form.cleaned_data["reason"].strip():
            form.add_error("reason", "Give a reason: it is kept in the audit.")
        else:
            try:
                change = services.move_runs_off(
                    workflow,
                    version.number,
                    actor=operations.Actor.for_user(request.user),
                    reason=form.cleaned_data["reason"],
                    runs=form.cleaned_data["runs"],
                )
            except operations.OperationError as error:
                modeladmin.message_user(request, f"{workflow.slug}: {error}", messages.ERROR)
            else:
                level = messages.SUCCESS if change.changed else messages.INFO
                modeladmin.message_user(request, change.message, level)
            return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"Runs left on {workflow.slug} v{version.number}",
        "opts": modeladmin.model._meta,
        "version": version,
        "preview": services.preview_runs_left(workflow, version.number),
        "form": form,
        "action_name": request.POST.get("action"),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/workflows/move_runs_off.html", context)
