"""The node panel's log tools (download, live tail) and the Logs page's highlighting."""

import re

from django import template
from django.urls import reverse
from django.utils.html import escape
from django.utils.safestring import mark_safe

from workflows.models import NodeAttempt

register = template.Library()


@register.inclusion_tag("dashboard/_log_tail.html", takes_context=True)
def log_tools(context) -> dict:
    """What the log header offers for the attempt shown: a download link, and while the
    attempt runs and its newest page is shown, a tail that appends new lines.

    The tail carries the lines of that page itself and keeps them across the run page's
    2-second refresh (hx-preserve): the refresh never replaces it, so the two never show
    a line twice or lose one.
    """
    panel, run = context.get("panel"), context.get("run")
    log = getattr(panel, "log", None)
    attempt = getattr(log, "attempt", None)
    if attempt is None or run is None:
        return {"attempt": None}
    args = [run.pk, panel.node.node_key, attempt.number]
    live = attempt.status in NodeAttempt.ACTIVE and log.page >= log.pages
    return {
        "attempt": attempt,
        "download_url": reverse("dashboard:attempt-log-download", args=args),
        "tail_url": reverse("dashboard:attempt-log-tail", args=args),
        "live": live,
        "lines": log.lines if live else [],
        "after": log.lines[-1].seq if log.lines else 0,
    }


@register.filter
def highlight(text: str, needle: str) -> str:
    """``text`` escaped, with each case-insensitive occurrence of ``needle`` in <mark>."""
    if not needle:
        return escape(text)
    parts = re.split(f"({re.escape(needle)})", text, flags=re.IGNORECASE)
    return mark_safe(
        "".join(
            f"<mark>{escape(part)}</mark>" if index % 2 else escape(part)
            for index, part in enumerate(parts)
        )
    )
