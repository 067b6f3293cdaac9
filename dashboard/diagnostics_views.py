"""Diagnostics pages: stuck & findings, and the system report with its queue actions.

Pages are for staff. Queue actions are POST only, need ``diagnostics.operate_queues`` and
a reason, ask for confirmation first (a POST without ``confirm=yes`` shows what will
happen), and are audited by the operation they call.
"""

import contextlib
import json
import logging
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from diagnostics import operations, selectors, system_report
from workflows import actions

logger = logging.getLogger(__name__)

QUEUE_ACTIONS = {
    "clear": {
        "operation": "clear_queue",
        "url_name": "dashboard:clear-queue",
        "title": "Clear queue",
        "count_key": "queued",
        "effect": "job(s) waiting in queue {queue} will be removed.",
        "warning": (
            "Running and finished jobs are not touched. Nodes still queued in the database "
            "are re-sent by the watchdog within seconds: to stop runs, cancel them instead."
        ),
    },
    "requeue": {
        "operation": "requeue_failed",
        "url_name": "dashboard:requeue-failed",
        "title": "Requeue failed jobs",
        "count_key": "failed",
        "effect": "failed job(s) of queue {queue} will be put back on the queue.",
        "warning": (
            "A requeued Keel job runs only if its attempt is still the node's current one; "
            "a stale one is refused by the executor and recorded in its run's history."
        ),
    },
}


def staff_required(view):
    """Login (redirect to the login page), then staff (403): diagnostics show internals."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_staff:
            raise PermissionDenied("Diagnostics pages are for staff accounts (is_staff).")
        return view(request, *args, **kwargs)

    return login_required(wrapper)


@require_GET
@staff_required
def findings(request):
    return render(request, "dashboard/findings.html", {"findings": selectors.findings_by_cause()})


@require_GET
@staff_required
def system_report_page(request):
    # The page shows open findings as counts by cause (they are listed on the findings page):
    # reading rows it would not show costs a sort of every open finding.
    report = system_report.build_report(findings_limit=0)
    return render(
        request,
        "dashboard/system_report.html",
        {
            "report": report,
            "settings_json": json.dumps(report["settings"], indent=2, cls=DjangoJSONEncoder),
            "can_operate": request.user.has_perm(operations.PERMISSION),
            "shown_workers": system_report.SHOWN_WORKERS,
        },
    )


def _queue_action(request, queue: str, name: str):
    """Confirm (POST without confirm=yes), then act (POST with confirm=yes and a reason)."""
    action = QUEUE_ACTIONS[name]
    reason = request.POST.get("reason", "").strip()
    if not request.user.has_perm(operations.PERMISSION):
        # The operation refuses, and audits the refusal; then the 403 says what is missing.
        with contextlib.suppress(operations.QueueOperationError):
            actions.get(action["operation"]).perform(queue, actor=request.user, reason=reason)
        raise PermissionDenied(f"Operating queues needs the permission {operations.PERMISSION}.")
    if queue not in settings.RQ_QUEUES:
        raise Http404(f"No queue {queue!r}.")
    if request.POST.get("confirm") == "yes" and reason:
        try:
            outcome = actions.get(action["operation"]).perform(
                queue, actor=request.user, reason=reason
            )
        except operations.QueuePermissionDenied as error:
            raise PermissionDenied(str(error)) from None
        except operations.QueueOperationError as error:
            messages.error(request, str(error))
        else:
            (messages.success if outcome.changed else messages.info)(request, outcome.message)
        return redirect("dashboard:system-report")
    try:
        counts, counts_error = operations.queue_counts(queue), ""
    except operations.QueueOperationError as error:
        counts, counts_error = None, str(error)
    return render(
        request,
        "dashboard/confirm_queue_action.html",
        {
            "queue": queue,
            "action": action,
            "effect": action["effect"].format(queue=queue),
            "count": counts[action["count_key"]] if counts else None,
            "counts_error": counts_error,
            "reason": reason,
            "reason_missing": request.POST.get("confirm") == "yes" and not reason,
        },
    )


@require_POST
@staff_required
def clear_queue(request, queue):
    return _queue_action(request, queue, "clear")


@require_POST
@staff_required
def requeue_failed(request, queue):
    return _queue_action(request, queue, "requeue")
