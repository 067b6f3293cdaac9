"""State-changing dashboard views: start a run, and the operator actions on a run.

Each action has a preview page (GET) that shows what it will do and asks for a
reason, and an action URL (POST only) that calls the one operation and redirects.
Permission is checked by the operation itself, so a refused attempt is recorded in
the run's history before the 403 is returned.
"""

from dataclasses import dataclass
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from dashboard import forms, run_page
from dashboard.views import get_run_for_user, workflow_context
from workflows import actions, operations
from workflows.models import Run, Workflow


@dataclass(frozen=True)
class Action:
    """How the dashboard shows one action of the registry: its page's title and form."""

    registered: actions.Action
    title: str
    form: type[forms.ActionForm]

    @property
    def slug(self) -> str:  # in the URL
        return self.registered.slug

    @property
    def name(self) -> str:  # in the preview and the history
        return self.registered.name

    @property
    def button(self) -> str:
        return self.registered.label

    @property
    def danger(self) -> bool:
        return self.registered.danger

    @property
    def needs_node(self) -> bool:
        return self.registered.acts_on_node

    def call(self, run_id, **kwargs) -> operations.Outcome:
        return self.registered.perform(run_id, **kwargs)


PAGES = {
    "resume": ("Resume the run", forms.ActionForm),
    "retry": ("Retry a node", forms.RetryForm),
    "rollback": ("Roll the run back", forms.RollbackForm),
    "cancel": ("Cancel the run", forms.ActionForm),
    "skip": ("Skip a node", forms.NodeActionForm),
    "mark_succeeded": ("Mark a node succeeded", forms.MarkSucceededForm),
    "stop_node": ("Stop a running node", forms.StopNodeForm),
}
ACTIONS = {
    action.slug: action
    for action in (
        Action(registered, *PAGES[registered.name]) for registered in actions.for_target("run")
    )
}


def _action(slug: str) -> Action:
    return ACTIONS[slug]  # the URLconf only routes known slugs


def _preview_options(action: Action, options: dict) -> dict:
    """The keyword arguments operations.preview takes for this action."""
    if action.needs_node:
        keep = {"node", "downstream", "expected_attempt", "output"}
    elif action.name == "rollback":
        keep = {"to_checkpoint", "to_node", "resume"}
    else:
        keep = set()
    return {key: value for key, value in options.items() if key in keep}


def _run_url(run: Run, node: str | None = None) -> str:
    url = run.get_absolute_url()
    return f"{url}?{urlencode({'node': node})}" if node else url


def _confirm_page(request, run: Run, action: Action, form, options: dict, *, status=200, error=""):
    """The preview of ``action`` with ``options`` and the form that confirms it."""
    preview = None
    chooser = action.name == "rollback" and not (
        options.get("to_checkpoint") or options.get("to_node")
    )
    if action.needs_node and not options.get("node"):
        error = error or "Pick a node first: open it on the run page and use its buttons."
    elif not chooser:
        try:
            preview = action.registered.preview(run.pk, **_preview_options(action, options))
        except operations.OperationError as problem:
            error = error or str(problem)
    node = options.get("node") or options.get("to_node") or None
    context = {
        "run": run,
        "action": action,
        "form": form,
        "options": options,
        "preview": preview,
        "error": error,
        "node": node,
        "back_url": _run_url(run, node),
        "post_url": reverse(f"dashboard:run-{action.slug}", args=[run.pk]),
        "may_operate": request.user.has_perm(operations.OPERATE_PERMISSION),
    }
    if chooser:
        context.update(run_page.rollback_targets(run))
    if options.get("to_checkpoint"):
        context["checkpoint"] = run_page.checkpoint_of(run, options["to_checkpoint"])
    return render(request, "dashboard/action_confirm.html", context, status=status)


@require_GET
@login_required
def preview(request, run_id, action):
    """What the action would do now, and the form to confirm it with a reason."""
    action = _action(action)
    run = get_run_for_user(request, run_id)
    query = forms.PreviewOptionsForm(request.GET)
    given = query.cleaned_data if query.is_valid() else {}
    options = {key: value for key, value in given.items() if value not in (None, "")}
    pinned = action.name in ("retry", "stop_node")
    if pinned and options.get("node") and "expected_attempt" not in options:
        # Pin the attempt seen now: if it moves on before the confirm, nothing happens twice.
        options["expected_attempt"] = run_page.current_attempt(run, options["node"])
    initial = {**options, "request_key": forms.ActionForm.new_request_key()}
    if action.name == "mark_succeeded":
        initial["output"] = "{}"
    if action.name == "rollback":
        initial["resume"] = True
    return _confirm_page(request, run, action, action.form(initial=initial), options)


@require_POST
@login_required
def act(request, run_id, action):
    """Apply the action: parse the form, call the operation, say what happened, redirect."""
    action = _action(action)
    run = get_run_for_user(request, run_id)
    if not request.user.has_perm(operations.OPERATE_PERMISSION):
        return _refuse(request, run, action)
    form = action.form(request.POST)
    if not form.is_valid():
        options = {k: v for k, v in form.cleaned_data.items() if k not in ("reason", "request_key")}
        return _confirm_page(request, run, action, form, options, status=400)
    options = form.options()
    try:
        outcome = action.call(
            run.pk,
            actor=operations.Actor.for_user(request.user),
            reason=form.cleaned_data["reason"],
            request_key=form.cleaned_data["request_key"],
            **options,
        )
    except operations.OperationDenied as denied:
        return render(
            request, "dashboard/denied.html", {"message": str(denied), "run": run}, status=403
        )
    except operations.OperationError as problem:
        return _confirm_page(request, run, action, form, options, status=400, error=str(problem))
    (messages.success if outcome.changed else messages.info)(request, outcome.message)
    return redirect(_run_url(run, options.get("node") or options.get("to_node")))


def _refuse(request, run: Run, action: Action):
    """403 for a user who may not operate; the operation itself refuses and records it."""
    message = f"Acting on runs needs the {operations.OPERATE_PERMISSION} permission."
    reason = str(request.POST.get("reason", "")).strip() or "(no reason given)"
    node = {"node": str(request.POST.get("node", ""))[:100]} if action.needs_node else {}
    try:
        action.call(run.pk, actor=operations.Actor.for_user(request.user), reason=reason, **node)
    except operations.OperationError as denied:  # OperationDenied, recorded in the history
        message = str(denied)
    return render(request, "dashboard/denied.html", {"message": message, "run": run}, status=403)


@require_POST
@login_required
def start_run(request, slug):
    """Start a run of the workflow's latest version with the params given as JSON."""
    workflow = get_object_or_404(Workflow, slug=slug)
    try:
        operations.check_may_start(operations.Actor.for_user(request.user), workflow)
    except operations.OperationDenied as denied:  # audited by the operation
        return render(request, "dashboard/denied.html", {"message": str(denied)}, status=403)
    form = forms.StartRunForm(request.POST)
    if form.is_valid():
        try:
            run = operations.start_run(
                workflow.slug,
                actor=operations.Actor.for_user(request.user),
                params=form.cleaned_data["params"],
                priority=form.cleaned_data["priority"],
                request_key=form.cleaned_data["request_key"] or None,
            )
        except operations.OperationDenied as denied:
            return render(request, "dashboard/denied.html", {"message": str(denied)}, status=403)
        except operations.OperationError as problem:
            form.add_error("params", str(problem))
        else:
            messages.success(request, f"Started run {run.pk} of {workflow.slug}.")
            return redirect(run)
    return render(
        request, "dashboard/workflow_detail.html", workflow_context(workflow, form), status=400
    )
