"""The Workers page: every RQ worker, what it runs now, and a way to stop that node.

For staff, like the other diagnostics pages. The table updates itself (htmx polls the same
URL every few seconds and gets the partial). Stopping a node goes through the registry's
``stop_node`` action: its preview page, a reason, the audited operation.
"""

from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from dashboard.diagnostics_views import staff_required
from diagnostics import workers as selector
from workflows import operations

# htmx stops polling when a response has this status (and still swaps it in).
STOP_POLLING = 286
POLL_SECONDS = 5


@require_GET
def workers(request):
    """The page, or (asked by htmx) the table alone."""
    polled = request.headers.get("HX-Request") == "true"
    if polled and not request.user.is_authenticated:
        # A redirect to the login page would be swapped into the table; say it instead.
        return render(
            request,
            "dashboard/_workers_signed_out.html",
            {"next": reverse("dashboard:workers")},
            status=STOP_POLLING,
        )
    return _workers(request, polled=polled)


@staff_required
def _workers(request, *, polled: bool):
    context = {
        "listing": selector.list_workers(),
        "can_operate": request.user.has_perm(operations.OPERATE_PERMISSION),
        "poll_seconds": POLL_SECONDS,
    }
    template = "dashboard/_workers.html" if polled else "dashboard/workers.html"
    return render(request, template, context)
