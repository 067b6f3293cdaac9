"""One action on many runs (the runs list's ticked rows): a preview of what happens to each,
one reason, then each run through its own audited operation (workflows.bulk)."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from dashboard import forms
from dashboard.views import _can_view
from workflows import bulk, operations

TITLES = {"resume": "Resume runs", "cancel": "Cancel runs"}


@require_GET
@_can_view
def preview(request):
    choice = forms.BulkChoiceForm(request.GET)
    if not choice.is_valid():
        return _page(request, error=_first_error(choice), status=400)
    name, run_ids = choice.cleaned_data["action"], choice.cleaned_data["run"]
    form = forms.BulkActionForm(
        initial={
            "action": name,
            "run": run_ids,
            "request_key": forms.ActionForm.new_request_key(),
        }
    )
    return _page(request, name=name, run_ids=run_ids, form=form)


@require_POST
@_can_view
def apply(request):
    form = forms.BulkActionForm(request.POST)
    if not form.is_valid():
        name = request.POST.get("action")
        ids = form.cleaned_data.get("run") or []
        return _page(request, name=name, run_ids=ids, form=form, status=400)
    name, run_ids = form.cleaned_data["action"], form.cleaned_data["run"]
    try:
        results = bulk.apply(
            name,
            run_ids,
            actor=operations.Actor.for_user(request.user),
            reason=form.cleaned_data["reason"],
            request_key=form.cleaned_data["request_key"],
        )
    except operations.OperationDenied as denied:
        return render(request, "dashboard/denied.html", {"message": str(denied)}, status=403)
    except bulk.BulkError as problem:
        return _page(request, name=name, run_ids=[], form=form, error=str(problem), status=400)
    changed = [result for result in results if result.changed]
    unchanged = [result for result in results if not result.changed]
    verb = "resumed" if name == "resume" else "cancelled"
    if changed:
        ids = ", ".join(str(result.run_id) for result in changed)
        messages.success(
            request, f"{len(changed)} run{'s' if len(changed) != 1 else ''} {verb}: {ids}."
        )
    for result in unchanged:
        messages.info(request, f"Run {result.run_id} unchanged: {result.message}")
    return redirect(reverse("dashboard:run-list"))


def _page(request, *, name=None, run_ids=(), form=None, error="", status=200):
    lines = []
    if not error:
        try:
            lines = bulk.preview(name, run_ids)
        except bulk.BulkError as problem:
            error, status = str(problem), 400
    applies = sum(1 for line in lines if line.applies)
    context = {
        "title": TITLES.get(name, "Act on runs"),
        "action": name,
        "lines": lines,
        "applies": applies,
        "form": form,
        "error": error,
        "may_operate": request.user.has_perm(operations.OPERATE_PERMISSION),
        "limit": bulk.BULK_LIMIT,
    }
    return render(request, "dashboard/bulk_confirm.html", context, status=status)


def _first_error(form) -> str:
    for field, errors in form.errors.items():
        return f"{field}: {errors[0]}"
    return "The request was not understood."
