"""Reads over node logs: search across runs, one attempt's log as text, and its live tail.

Used by the dashboard's Logs page and node panel, ``GET /api/v1/logs`` and
``manage.py search_logs``. What each read costs is in its docstring; the numbers behind
them are in docs/architecture.md ("Searching runs and logs").
"""

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice

from django.db.models import Count, Q
from django.utils import timezone

from workflows.models import LogLine, NodeAttempt

# The levels Python's logging gives, lowest first; "at least WARNING" means these from
# WARNING on. A level outside this list (a custom one) is found by "any level" only.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Counting stops here: past it a count says "more than 10 000" instead of reading on.
COUNT_CAP = 10_000
PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
# With no window given, pages, the API and the command search the last 24 hours.
DEFAULT_WINDOW = timedelta(hours=24)
TAIL_LINES = 500
DOWNLOAD_CHUNK = 2_000
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class LogFilter:
    """What to look for. Every part is optional; ``since``/``until`` bound the window."""

    text: str = ""  # case-insensitive "contains"
    level: str = ""  # at least this level (one of LEVELS)
    workflow_id: int | None = None
    node: str = ""  # a node key, exactly
    run_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive


@dataclass(frozen=True)
class Cursor:
    """Where the next (older) page starts: the last line seen, by (at, id)."""

    at: datetime
    pk: int

    def encode(self) -> str:
        raw = f"{self.at.isoformat()}|{self.pk}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Cursor":
        """Raises ValueError for anything this module did not encode."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            at, pk = raw.split("|")
            when, number = datetime.fromisoformat(at), int(pk)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ValueError("not a log cursor") from None
        if when.tzinfo is None or not 0 < number <= MAX_ID:
            raise ValueError("not a log cursor")
        return cls(when, number)


@dataclass
class Page:
    lines: list[LogLine]  # newest first, with attempt, node run, run and workflow
    next_cursor: Cursor | None  # None on the last page


@dataclass
class Counts:
    total: int  # at most COUNT_CAP
    capped: bool  # more than COUNT_CAP lines match
    # Highest level first, levels with lines only ("other": a level not in LEVELS).
    # Exact unless capped; then each is a lower bound.
    by_level: list[tuple[str, int]]

    @property
    def cap(self) -> int:
        return COUNT_CAP


def levels_at_least(level: str) -> list[str]:
    """``level`` and the levels above it (``"warning"`` → WARNING, ERROR, CRITICAL)."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"{level!r} is not a level; use one of {', '.join(LEVELS)}.")
    return list(LEVELS[LEVELS.index(level) :])


def default_since(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - DEFAULT_WINDOW


def matching(search: LogFilter):
    """The lines ``search`` finds, unordered.

    The window is read from the logline_at index (at, id); the other conditions are checked
    on the lines in it (workflow, node and run through the attempt's node run, a primary-key
    probe each). So a search costs what its window holds, not what the table holds: a page
    stops at its 100 matches and a count at its cap, and only a text no line in the window
    has reads all of it (24 h of 1 000 000 lines over 30 days: 24 ms). A workflow and node
    filter may instead be read from the node's runs: one probe per run of that node.
    """
    lines = LogLine.objects.all()
    if search.since is not None:
        lines = lines.filter(at__gte=search.since)
    if search.until is not None:
        lines = lines.filter(at__lt=search.until)
    if search.level:
        lines = lines.filter(level__in=levels_at_least(search.level))
    if search.text:
        lines = lines.filter(message__icontains=search.text)
    if search.run_id is not None:
        lines = lines.filter(attempt__node_run__run_id=search.run_id)
    if search.workflow_id is not None:
        lines = lines.filter(attempt__node_run__run__workflow_id=search.workflow_id)
    if search.node:
        lines = lines.filter(attempt__node_run__node_key=search.node)
    return lines


def page(search: LogFilter, *, cursor: Cursor | None = None, size: int | None = None) -> Page:
    """One page of matching lines, newest first, by keyset on (at, id).

    ``size`` (default PAGE_SIZE) is clamped to MAX_PAGE_SIZE. One query, with the line's
    attempt, node run, run and workflow joined in; page 1 000 costs what page 1 costs.
    """
    size = max(1, min(size or PAGE_SIZE, MAX_PAGE_SIZE))
    lines = matching(search)
    if cursor is not None:
        # (at, id) < cursor, with the at bound stated alone so that the index scan starts
        # at the cursor instead of reading every newer line.
        lines = lines.filter(Q(at__lte=cursor.at), Q(at__lt=cursor.at) | Q(pk__lt=cursor.pk))
    rows = list(
        lines.select_related("attempt__node_run__run__workflow")
        .only(
            "id",
            "seq",
            "at",
            "level",
            "message",
            "attempt__id",
            "attempt__number",
            "attempt__status",
            "attempt__node_run__id",
            "attempt__node_run__node_key",
            "attempt__node_run__run__id",
            "attempt__node_run__run__workflow__id",
            "attempt__node_run__run__workflow__slug",
        )
        .order_by("-at", "-id")[: size + 1]
    )
    more = len(rows) > size
    rows = rows[:size]
    return Page(lines=rows, next_cursor=Cursor(rows[-1].at, rows[-1].pk) if more else None)


def counts(search: LogFilter) -> Counts:
    """How many lines match, and how many of them at each level: one query.

    Bounded like the runs list's count: it stops at COUNT_CAP + 1 matching lines, read in
    whatever order is cheapest (no sort). Past the cap, ``capped`` is set and the
    per-level numbers are lower bounds: they count the lines read before it stopped.
    """
    found = (
        matching(search)
        .order_by()[: COUNT_CAP + 1]
        .aggregate(
            total=Count("id"),
            **{f"n_{level}": Count("id", filter=Q(level=level)) for level in LEVELS},
        )
    )
    total = found.pop("total")
    by_level = [(level, found[f"n_{level}"]) for level in reversed(LEVELS)]
    by_level.append(("other", total - sum(n for _, n in by_level)))
    return Counts(
        total=min(total, COUNT_CAP),
        capped=total > COUNT_CAP,
        by_level=[(level, n) for level, n in by_level if n],
    )


# --- One attempt's log ------------------------------------------------------------------------


def one_line(message: str) -> str:
    """``message`` on one line: its own line breaks written as \\n (and \\ as \\\\)."""
    return message.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def text_line(at: datetime, level: str, message: str) -> str:
    """A log line as the download writes it: ISO time, level, message, then a newline."""
    when = timezone.localtime(at).isoformat(timespec="milliseconds")
    return f"{when} {level} {one_line(message)}\n"


def download_chunks(attempt: NodeAttempt, chunk_size: int = DOWNLOAD_CHUNK) -> Iterator[str]:
    """The attempt's whole log as text, ``chunk_size`` lines at a time.

    Read with ``iterator()`` (a server-side cursor on PostgreSQL), so memory holds one
    chunk whatever the log's length: a 1 000 000-line log streams in constant memory.
    """
    rows = (
        LogLine.objects.filter(attempt=attempt)
        .order_by("seq")
        .values_list("at", "level", "message")
        .iterator(chunk_size=chunk_size)
    )
    while chunk := list(islice(rows, chunk_size)):
        yield "".join(text_line(*row) for row in chunk)


def download_name(attempt: NodeAttempt) -> str:
    node = attempt.node_run
    return f"run-{node.run_id}-{node.node_key}-attempt-{attempt.number}.log"


@dataclass
class Tail:
    lines: list[LogLine]
    after: int  # the last seq sent (or the one asked after, if none is new)
    finished: bool  # the attempt is over and every line was sent: stop asking


def tail(attempt: NodeAttempt, after: int, limit: int | None = None) -> Tail:
    """The attempt's lines after seq ``after``, oldest first, at most ``limit`` (default
    TAIL_LINES).

    Reads the logline_seq_unique index from ``after`` on: a poll costs the new lines
    only. ``finished`` once the attempt ended (its last lines are written before it
    ends) and nothing more is left to send.
    """
    limit = limit or TAIL_LINES
    rows = list(
        LogLine.objects.filter(attempt=attempt, seq__gt=after)
        .only("id", "seq", "at", "level", "message")
        .order_by("seq")[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Tail(
        lines=rows,
        after=rows[-1].seq if rows else after,
        finished=attempt.status in NodeAttempt.TERMINAL and not more,
    )
