"""Logs: the search page across runs, and one attempt's log as a download and a live tail.

Thin: parse the query, call workflows.log_search, render. What a search costs is said
there.
"""

from urllib.parse import urlencode

from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET

from dashboard.log_forms import LogSearchForm
from dashboard.run_page import LOG_PAGE_SIZE
from dashboard.views import STOP_POLLING, VIEW_PERMISSION, _can_view
from workflows import log_search
from workflows.models import NodeAttempt


@require_GET
@_can_view
def logs(request):
    now = timezone.now()
    form = LogSearchForm(request.GET or None)
    valid = form.is_bound and form.is_valid()
    search = form.log_filter(now) if valid else LogSearchForm.default_filter(now)
    cursor = form.cleaned_data.get("cursor") if valid else None
    page = log_search.page(search, cursor=cursor)
    for line in page.lines:
        line.href = _line_href(line)
    query = request.GET.copy()
    query.pop("cursor", None)
    return render(
        request,
        "dashboard/logs.html",
        {
            "form": form,
            "page": page,
            "counts": log_search.counts(search),
            "search": search,
            "window_words": form.window_words() if valid else "in the last 24 hours",
            "first_page": cursor is None,
            "newest_query": query.urlencode(),
            "older_query": _older(query, search, page.next_cursor.encode())
            if page.next_cursor
            else None,
        },
    )


def _older(query, search, cursor: str) -> str:
    """The next page's query: its window pinned where this page's began ("the last 24
    hours" read later would start later and skip the oldest lines)."""
    query = query.copy()
    query.pop("window", None)
    if search.since is not None:
        query["since"] = search.since.isoformat()
    else:
        query["window"] = "all"
    return _with(query, cursor=cursor)


def _with(query, **changes) -> str:
    query = query.copy()
    for name, value in changes.items():
        query[name] = value
    return query.urlencode()


def _line_href(line) -> str:
    """The run page, with the line's node, attempt and log page open."""
    attempt = line.attempt
    query = urlencode(
        {
            "node": attempt.node_run.node_key,
            "attempt": attempt.number,
            "log_page": (line.seq - 1) // LOG_PAGE_SIZE + 1,
        }
    )
    return f"{reverse('dashboard:run-detail', args=[attempt.node_run.run_id])}?{query}#log"


def _attempt_for_user(request, run_id: int, node_key: str, number: int) -> NodeAttempt:
    """The attempt, or 404 (the decorators have checked the permission)."""
    return get_object_or_404(
        NodeAttempt.objects.select_related("node_run"),
        node_run__run_id=run_id,
        node_run__node_key=node_key,
        number=number,
    )


@require_GET
@_can_view
def attempt_log_download(request, run_id: int, node_key: str, number: int):
    """The attempt's whole log as text/plain, streamed (memory stays one chunk)."""
    attempt = _attempt_for_user(request, run_id, node_key, number)
    response = StreamingHttpResponse(
        log_search.download_chunks(attempt), content_type="text/plain; charset=utf-8"
    )
    response["Content-Disposition"] = content_disposition_header(
        True, log_search.download_name(attempt)
    )
    return response


@require_GET
def attempt_log_tail(request, run_id: int, node_key: str, number: int):
    """The attempt's lines after ``?after=SEQ``, polled by the node panel's live tail;
    286 (htmx: stop polling) once the attempt is over and every line was sent."""
    if not request.user.is_authenticated:
        return HttpResponse(status=STOP_POLLING)  # the run page itself says "signed out"
    if not request.user.has_perm(VIEW_PERMISSION):
        return HttpResponse(status=403)
    attempt = _attempt_for_user(request, run_id, node_key, number)
    try:
        after = min(max(int(request.GET.get("after", "0")), 0), log_search.MAX_ID)
    except ValueError:
        after = 0
    tail = log_search.tail(attempt, after)
    return render(
        request,
        "dashboard/_log_tail_lines.html",
        {"attempt": attempt, "tail": tail},
        status=STOP_POLLING if tail.finished else 200,
    )
