import json

from django.core.management.base import BaseCommand
from django.core.serializers.json import DjangoJSONEncoder

from diagnostics import rq_state, system_report


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _cell(value) -> str:
    # A pipe would end a Markdown table cell early.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list], markdown: bool) -> list[str]:
    rows = [[_cell(value) if markdown else str(value) for value in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def render(report: dict, *, markdown: bool) -> str:
    """The report as text for a terminal, or as Markdown to paste into an issue."""
    out: list[str] = []

    def section(title: str) -> None:
        out.extend(["", f"## {title}" if markdown else f"== {title} ==", ""])

    out.append(
        f"# Keel system report — {report['host']}, {_when(report['generated_at'])} UTC"
        if markdown
        else f"Keel system report — {report['host']}, {_when(report['generated_at'])} UTC"
    )
    section("Checks")
    out += _table(
        ["", "check", "seen", "fix"],
        [["✓" if c["ok"] else "✗", c["name"], c["detail"], c["fix"]] for c in report["checks"]],
        markdown,
    )
    section("Versions")
    out += _table(["component", "version"], list(report["versions"].items()), markdown)
    section("Database and Redis")
    database, redis_state = report["database"], report["redis"]
    out += _table(
        ["", "reachable", "latency ms", "detail"],
        [
            [
                "database",
                database["reachable"],
                database.get("latency_ms", "—"),
                database.get("error")
                or (
                    f"{database.get('connections')} of {database.get('max_connections')} connections"
                    if database.get("max_connections")
                    else ""
                ),
            ],
            [
                "redis",
                redis_state["reachable"],
                redis_state.get("latency_ms", "—"),
                redis_state.get("error")
                or f"{redis_state.get('used_memory')} bytes used, maxmemory "
                f"{redis_state.get('maxmemory') or 'none'}, policy {redis_state.get('maxmemory_policy')}",
            ],
        ],
        markdown,
    )
    section("Queues")
    if report["queues_error"]:
        out.append(f"Redis could not be read: {report['queues_error']}")
    out += _table(
        ["queue", "waiting", "oldest (s)", "live workers", *rq_state.REGISTRIES],
        [
            [
                queue["name"],
                queue["length"],
                queue["oldest_age_seconds"] if queue["oldest_age_seconds"] is not None else "—",
                _live_workers(queue),
                *queue["registries"].values(),
            ]
            for queue in report["queues"]
        ],
        markdown,
    )
    section("Workers")
    out += _table(
        [
            "name",
            "host",
            "pid",
            "state",
            "queues",
            "current job",
            "last heartbeat",
            "ok",
            "failed",
            "alive",
        ],
        [
            [
                worker["name"],
                worker["hostname"],
                worker["pid"] or "",
                worker["state"],
                ",".join(worker["queues"]),
                worker["current_job"] or "—",
                _when(worker["last_heartbeat"]),
                worker["successful_jobs"],
                worker["failed_jobs"],
                "NO" if not worker["alive"] else ("FROZEN" if worker["unresponsive"] else "yes"),
            ]
            for worker in report["workers"]
        ],
        markdown,
    )
    section("Supervised processes")
    supervised = report["supervision"]
    if supervised["error"]:
        out.append(supervised["error"])
    elif not supervised["supervised"]:
        out.append(
            "Not supervised by devstack (under systemd: systemctl status 'keel-worker@*' "
            "keel-watchdog keel-web)."
        )
    else:
        if supervised["stale"]:
            out.append(f"The devstack that wrote {supervised['path']} is gone; this is old.")
        out += _table(
            ["process", "pid", "state", "restarts", "last exit"],
            [
                [
                    row["name"],
                    row["pid"] or "",
                    row["state"],
                    row["restarts"],
                    f"{row['last_exit']} at {_when(row['last_exit_at'])}"
                    if row["last_exit"]
                    else "—",
                ]
                for row in supervised["processes"]
            ],
            markdown,
        )
    section("Open findings")
    findings = report["findings"]
    if findings.get("error"):
        out.append(f"Findings could not be read: {findings['error']}")
    out += _table(
        ["code", "severity", "subject", "title", "open since"],
        [
            [row["code"], row["severity"], row["subject"], row["title"], _when(row["first_seen"])]
            for row in findings["findings"]
        ],
        markdown,
    )
    if findings.get("open") and findings["open"] > len(findings["findings"]):
        out.append(f"… and {findings['open'] - len(findings['findings'])} more.")
    section("Settings (secrets masked)")
    dump = json.dumps(report["settings"], indent=2, cls=DjangoJSONEncoder)
    out += ["```json", dump, "```"] if markdown else [dump]
    return "\n".join(out)


class Command(BaseCommand):
    help = (
        "Print the system report: versions, settings (secrets masked), database and Redis "
        "health, queues, workers, RQ registries, open findings."
    )

    def add_arguments(self, parser):
        style = parser.add_mutually_exclusive_group()
        style.add_argument("--json", action="store_true", help="Machine-readable JSON.")
        style.add_argument(
            "--markdown", action="store_true", help="Markdown, to paste into an issue."
        )

    def handle(self, *args, **options):
        report = system_report.build_report()
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, cls=DjangoJSONEncoder))
        else:
            self.stdout.write(render(report, markdown=options["markdown"]))


def _live_workers(queue: dict) -> str:
    """ "3: w1, w2, w3"; at most ten names (every live worker is counted)."""
    if not queue["live"]:
        return "NONE"
    names = ", ".join(queue["workers"][:10])
    more = " …" if queue["live"] > len(queue["workers"][:10]) else ""
    return f"{queue['live']}: {names}{more}" if names else str(queue["live"])
