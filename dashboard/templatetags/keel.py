"""Formatting for the dashboard's templates: pretty JSON, durations, status glyphs.

Every filter returns plain text; autoescaping still applies to what they return.
"""

import json
from datetime import timedelta
from html import escape  # what Django's escape calls, without its lazy-text wrapper

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from dashboard.run_summary import node_href
from diagnostics import explain

register = template.Library()

# Status is shown as colour *and* a glyph and the word, never colour alone.
STATUS_GLYPHS = {
    "pending": "○",
    "queued": "◔",
    "running": "▶",
    "retry_wait": "↻",
    "succeeded": "✓",
    "failed": "✕",
    "timed_out": "◷",
    "cancelled": "⊘",
    "skipped": "↷",
    "abandoned": "⊘",
    "definition": "□",
}


@register.filter
def pretty_json(value) -> str:
    """Indented JSON, keys sorted; ``None`` reads as ``null``."""
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


@register.filter
def status_glyph(status) -> str:
    return STATUS_GLYPHS.get(str(status), "•")


@register.filter
def status_label(status) -> str:
    return str(status).replace("_", " ")


@register.filter
def seconds(value) -> str:
    """A duration in seconds (or a timedelta) as 0.42s, 12.3s, 4m 05s, 2h 01m, 3d 4h."""
    if value is None or value == "":
        return "—"
    if isinstance(value, timedelta):
        value = value.total_seconds()
    value = float(value)
    if value < 10:
        return f"{value:.2f}s"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


@register.filter
def ago(moment) -> str:
    """How long ago, short: 4s ago, 3m ago, 2h ago, 5d ago."""
    if not moment:
        return "—"
    delta = (timezone.now() - moment).total_seconds()
    if delta < 0:
        return "in " + seconds(-delta)
    if delta < 60:
        return f"{int(delta)}s ago"
    if delta < 3600:
        return f"{int(delta // 60)}m ago"
    if delta < 48 * 3600:
        return f"{int(delta // 3600)}h ago"
    return f"{int(delta // 86400)}d ago"


@register.simple_tag
def when(moment, precise: bool = False) -> str:
    """A moment as "4s ago", with the exact time on hover; static/times.js keeps the
    words true after the page stops polling."""
    if not moment:
        return "—"
    local = timezone.localtime(moment)
    exact = f"{local:%Y-%m-%d %H:%M:%S.%f}"[:-3] if precise else f"{local:%Y-%m-%d %H:%M:%S}"
    return format_html(
        '<time datetime="{}" title="{} {}" data-ago>{}</time>',
        moment.isoformat(),
        exact,
        local.tzname(),
        ago(moment),
    )


@register.inclusion_tag("dashboard/_evidence.html")
def evidence_table(finding) -> dict:
    """A finding's evidence as a small table of labelled values with units and times."""
    return {"rows": explain.evidence_rows(finding.raw_evidence)}


@register.filter
def percent(value, digits=1) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.{int(digits)}f}%"


@register.simple_tag(takes_context=True)
def query_with(context, **changes) -> str:
    """The current query string with some parameters replaced (None or "" removes one)."""
    params = context["request"].GET.copy()
    for key, value in changes.items():
        if value is None or value == "":
            params.pop(key, None)
        else:
            params[key] = value
    encoded = params.urlencode()
    return f"?{encoded}" if encoded else "?"


@register.simple_tag
def badge(status) -> str:
    """A status as glyph + word on the status colour (colour is never the only cue)."""
    status = str(status or "")
    css = status if status in STATUS_GLYPHS else "unknown"
    return format_html(
        '<span class="badge s-{}"><span aria-hidden="true">{}</span> {}</span>',
        css,
        status_glyph(status),
        status_label(status),
    )


@register.filter
def css_status(status) -> str:
    """A status safe to put in a class name: a known status, else "unknown"."""
    return status if status in STATUS_GLYPHS else "unknown"


@register.filter
def tick_ms(seconds) -> str:
    """A watchdog tick's duration: "42 ms", or "1.3 s" once it is long."""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return "?"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


# A wide run's page has a row per node in the timeline and in the node table: built here
# with format_html (escaped like the template), as a 1 000-node run's template loops took
# most of its page time.


@register.simple_tag
def timeline_rows(rows) -> str:
    """The timeline's rows: each node's attempts as bars (queued part, then running).
    Every text is escaped here (``escape``), as format_html would; numbers are floats."""
    return mark_safe(
        "\n".join(
            f'<div class="tl-row"><a class="tl-name" href="{escape(row.href)}" '
            f'title="{escape(row.key)}">{escape(row.key)}</a>'
            f'<span class="tl-track">{_bars(row.bars)}</span></div>'
            for row in rows
        )
    )


def _bars(bars) -> str:
    if not bars:
        return '<span class="tl-none">not run</span>'
    return "".join(
        (
            f'<span class="tl-wait" style="left: {float(bar.wait_left)}%; '
            f'width: {float(bar.wait_width)}%"></span>'
            if bar.wait_width
            else ""
        )
        + f'<span class="tl-bar s-{css_status(bar.status)}" style="left: {float(bar.left)}%; '
        f'width: {float(bar.width)}%" title="{escape(bar.title)}">'
        + (f"#{int(bar.attempt)}" if bar.width > 6 else "")
        + "</span>"
        for bar in bars
    )


@register.simple_tag
def node_rows(nodes) -> str:
    """A table row per node: its key (a link to its panel) and its status. Escaped here
    (``escape``); a badge is built once per status."""
    badges: dict[str, str] = {}
    return mark_safe(
        "".join(
            f'<tr><td><a href="{escape(node_href(node.node_key))}">{escape(node.node_key)}</a>'
            f"</td><td>{badges.get(node.status) or badges.setdefault(node.status, badge(node.status))}"
            "</td></tr>"
            for node in nodes
        )
    )
