import re
from datetime import datetime, time, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from workflows import log_search
from workflows.models import Workflow

AGO = re.compile(r"^(\d+)\s*([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
WHEN_HELP = (
    "a time today (10:00), a date and time (2026-01-31 10:00, ISO 8601 with or without an "
    "offset; without one, in TIME_ZONE), or a span ago (90m, 2h, 7d)"
)


def parse_when(text: str, now: datetime) -> datetime:
    """A moment from the command line; ValueError saying what is accepted."""
    text = text.strip()
    ago = AGO.match(text)
    if ago:
        return now - timedelta(**{UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        clock = time.fromisoformat(text)
    except ValueError:
        pass
    else:
        today = timezone.localtime(now).date()
        return timezone.make_aware(datetime.combine(today, clock.replace(tzinfo=None)))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a moment: give {WHEN_HELP}.") from None
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


class Command(BaseCommand):
    help = (
        "Search node logs across runs (case-insensitive text, level and above, workflow, node, "
        "run, time window; the last 24 hours by default). Prints the newest matching lines, "
        "oldest of them first, or with --count how many match at each level."
    )

    def add_arguments(self, parser):
        parser.add_argument("text", nargs="?", default="", help="Lines containing this (any case).")
        parser.add_argument(
            "--level", help=f"This level and above: {', '.join(log_search.LEVELS)} (any case)."
        )
        parser.add_argument("--workflow", help="Only runs of this workflow (its slug).")
        parser.add_argument("--node", help="Only nodes with this key.")
        parser.add_argument("--run", type=int, help="Only this run.")
        parser.add_argument("--since", help=f"From this moment: {WHEN_HELP}. Default: 24h.")
        parser.add_argument("--until", help="Before this moment (same forms). Default: now.")
        parser.add_argument(
            "--limit", type=int, default=100, help="Print at most this many lines (default 100)."
        )
        parser.add_argument(
            "--count", action="store_true", help="Print how many lines match, by level, only."
        )

    def handle(self, *args, **options):
        search = self.log_filter(options)
        if options["count"]:
            self.print_counts(search)
        else:
            self.print_lines(search, options["limit"])

    def log_filter(self, options) -> log_search.LogFilter:
        now = timezone.now()
        try:
            since = parse_when(options["since"], now) if options["since"] else None
            until = parse_when(options["until"], now) if options["until"] else None
            if options["level"]:
                log_search.levels_at_least(options["level"])
        except ValueError as error:
            raise CommandError(str(error)) from None
        since = since or log_search.default_since(now)
        if until is not None and since >= until:
            raise CommandError(
                f"--since ({self.moment(since)}) must be before --until ({self.moment(until)})."
            )
        if options["limit"] < 1:
            raise CommandError("--limit must be 1 or more.")
        workflow_id = None
        if options["workflow"]:
            workflow = Workflow.objects.filter(slug=options["workflow"]).first()
            if workflow is None:
                known = ", ".join(Workflow.objects.values_list("slug", flat=True)[:20])
                raise CommandError(
                    f"There is no workflow {options['workflow']!r}; workflows: {known or 'none'}."
                )
            workflow_id = workflow.pk
        return log_search.LogFilter(
            text=options["text"],
            level=(options["level"] or "").upper(),
            workflow_id=workflow_id,
            node=options["node"] or "",
            run_id=options["run"],
            since=since,
            until=until,
        )

    def print_lines(self, search: log_search.LogFilter, limit: int) -> None:
        """The newest ``limit`` matches, read page by page, printed oldest first (as grep
        and tail print a log file)."""
        found, cursor = [], None
        while len(found) < limit:
            page = log_search.page(search, cursor=cursor, size=limit - len(found))
            found += page.lines
            cursor = page.next_cursor
            if cursor is None:
                break
        for line in reversed(found):
            node = line.attempt.node_run
            self.stdout.write(
                f"{self.moment(line.at)} {line.level:<8} run {node.run_id} "
                f"{node.run.workflow.slug} {node.node_key} #{line.attempt.number}: "
                f"{log_search.one_line(line.message)}"
            )
        more = " (there are older ones: raise --limit or narrow --since)" if cursor else ""
        self.stderr.write(
            f"{len(found)} matching line{'s' if len(found) != 1 else ''} "
            f"{self.window(search)}{more}."
        )

    def print_counts(self, search: log_search.LogFilter) -> None:
        counted = log_search.counts(search)
        prefix = "≥ " if counted.capped else ""
        for level, count in counted.by_level:
            self.stdout.write(f"{level:<9} {prefix}{count}")
        total = f"more than {counted.total}" if counted.capped else str(counted.total)
        levels = f"{search.level} and above, " if search.level else ""
        self.stdout.write(self.style.SUCCESS(f"total     {total} ({levels}{self.window(search)})"))

    def window(self, search: log_search.LogFilter) -> str:
        until = self.moment(search.until) if search.until else "now"
        return f"from {self.moment(search.since)} to {until}"

    @staticmethod
    def moment(at: datetime) -> str:
        return timezone.localtime(at).isoformat(timespec="milliseconds")
