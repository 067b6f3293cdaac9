"""Dashboard pages (GET): parse the query, call a selector, render.

State-changing views are in dashboard/action_views.py.
"""

from datetime import timedelta
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from dashboard import deployment_views, run_page, selectors
from dashboard.forms import RANGES, ActionForm, RunFilterForm, StartRunForm
from diagnostics import selectors as diagnostics_selectors
from diagnostics.reliability import DEFAULT_WINDOW, workflow_reliability
from workflows.models import Run, Workflow, WorkflowVersion

VIEW_PERMISSION = "workflows.view_run"
# htmx stops polling when a response has this status (and still swaps it in).
STOP_POLLING = 286


def _can_view(view):
    """Login (redirect to the login page), then the view permission (403, naming it)."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.has_perm(VIEW_PERMISSION):
            raise PermissionDenied(f"Seeing runs needs the {VIEW_PERMISSION} permission.")
        return view(request, *args, **kwargs)

    return login_required(wrapper)


def get_run_for_user(request, run_id) -> Run:
    """The run, or 404; 403 for a user who may not see runs."""
    run = get_object_or_404(Run.objects.select_related("workflow", "version"), pk=run_id)
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied(f"Seeing runs needs the {VIEW_PERMISSION} permission.")
    return run


def _int_param(request, name: str) -> int | None:
    try:
        value = int(request.GET.get(name, ""))
    except ValueError:
        return None
    return value if value >= 0 else None


# --- Overview and workflows -------------------------------------------------------------------


@require_GET
@_can_view
def overview(request):
    context = {**selectors.overview(), "findings": diagnostics_selectors.latest_open()}
    return render(request, "dashboard/overview.html", context)


@require_GET
@_can_view
def workflow_list(request):
    return render(request, "dashboard/workflow_list.html", {"workflows": selectors.workflow_list()})


def workflow_context(
    workflow: Workflow,
    start_form: StartRunForm | None = None,
    window: str | None = None,
    expand: list[str] | None = None,
) -> dict:
    """What the workflow page shows; also used to re-show it with a start-form error."""
    context = selectors.workflow_page(
        workflow, expand=expand or (), keep=(("window", window),) if window else ()
    )
    if start_form is None:
        start_form = StartRunForm(
            initial={
                "params": context["declared_params"],
                "request_key": ActionForm.new_request_key(),
            }
        )
    reliability = workflow_reliability(workflow, window=window or DEFAULT_WINDOW)
    release = deployment_views.release_context(workflow)
    return {**context, **release, "start_form": start_form, "reliability": reliability}


@require_GET
@_can_view
def workflow_detail(request, slug):
    workflow = get_object_or_404(Workflow, slug=slug)
    window = request.GET.get("window")
    context = workflow_context(workflow, window=window, expand=request.GET.getlist("expand"))
    return render(request, "dashboard/workflow_detail.html", context)


@require_GET
@_can_view
def workflow_diff(request, slug):
    workflow = get_object_or_404(Workflow, slug=slug)
    try:
        context = selectors.diff_page(
            workflow, old=_int_param(request, "from"), new=_int_param(request, "to")
        )
    except WorkflowVersion.DoesNotExist as missing:
        raise Http404(str(missing)) from None
    return render(request, "dashboard/workflow_diff.html", context)


# --- Runs -------------------------------------------------------------------------------------


@require_GET
@_can_view
def run_list(request):
    form = RunFilterForm(request.GET or None)
    data = form.cleaned_data if form.is_bound and form.is_valid() else {}
    since = data.get("created_from")
    if data.get("range"):
        since = max(filter(None, [since, timezone.now() - timedelta(hours=RANGES[data["range"]])]))
    runs = selectors.filter_runs(
        workflow=data.get("workflow"),
        status=data.get("status") or "",
        version=data.get("version"),
        since=since,
        until=data.get("created_to"),
        search=data.get("q") or "",
    )
    page = selectors.runs_page(runs, before=data.get("before"), after=data.get("after"))
    return render(
        request,
        "dashboard/run_list.html",
        {
            "form": form,
            "page": page,
            "filtered": any(v for k, v in data.items() if k not in ("before", "after")),
        },
    )


def _run_page_context(request, run: Run) -> dict:
    context = run_page.run_page(
        run,
        node_key=request.GET.get("node") or None,
        attempt=_int_param(request, "attempt"),
        log_page_number=_int_param(request, "log_page"),
        expand=request.GET.getlist("expand"),
    )
    # Polling keeps the node that is open now, even once it stops being the default one.
    query = request.GET.copy()
    if context["selected_key"]:
        query["node"] = context["selected_key"]
    context["live_query"] = query.urlencode()
    return context


@require_GET
@_can_view
def run_detail(request, run_id):
    run = get_run_for_user(request, run_id)
    return render(request, "dashboard/run_detail.html", _run_page_context(request, run))


@require_GET
def run_live(request, run_id):
    """The live part of the run page, polled by htmx; 286 once the run is finished."""
    if not request.user.is_authenticated:
        # A redirect to the login page would be swapped into the run page; say it instead.
        return render(
            request,
            "dashboard/_run_signed_out.html",
            {"next": reverse("dashboard:run-detail", args=[run_id])},
            status=STOP_POLLING,
        )
    run = get_run_for_user(request, run_id)
    return render(
        request,
        "dashboard/_run_live.html",
        _run_page_context(request, run),
        status=STOP_POLLING if run.is_finished else 200,
    )
