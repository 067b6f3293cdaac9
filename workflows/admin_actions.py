"""Admin actions that call operator operations: preview, reason, confirm, audit.

Each action first shows an intermediate page with the preview of every selected
object and a required reason; only the confirm POST calls the operation. A request
key in the form makes a double submit change nothing twice.
"""

import uuid
from dataclasses import dataclass

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.template.response import TemplateResponse

from workflows import actions, operations


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
