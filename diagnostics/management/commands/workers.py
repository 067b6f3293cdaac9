import json

from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder

from diagnostics import workers as selector
from diagnostics.management.commands.system_report import _table, _when


class Command(BaseCommand):
    help = (
        "List every RQ worker Redis knows of: host, pid, queues, state, the node it runs and "
        "since when, last heartbeat, job counts and restarts. Stop a worker's node with "
        "`manage.py stop_node RUN NODE --expected-attempt N --reason …`."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Machine-readable JSON.")
        parser.add_argument(
            "--limit",
            type=int,
            default=selector.WORKERS_SHOWN,
            help="Read at most this many workers in full (every one is counted).",
        )

    def handle(self, *args, **options):
        if options["limit"] < 1:
            raise CommandError("--limit must be at least 1.")
        listing = selector.list_workers(limit=options["limit"])
        if options["json"]:
            self.stdout.write(json.dumps(listing.as_dict(), indent=2, cls=DjangoJSONEncoder))
            if listing.error:
                raise CommandError(self._redis_down(listing))
            return
        if listing.error:
            raise CommandError(self._redis_down(listing))
        self.print_table(listing)

    @staticmethod
    def _redis_down(listing) -> str:
        return (
            f"Redis could not be read ({listing.error}), so the workers cannot be listed. "
            "Check REDIS_URL and run `manage.py doctor`."
        )

    def print_table(self, listing: selector.WorkerList) -> None:
        if not listing.workers:
            self.stdout.write(
                self.style.WARNING(
                    "No worker is registered. Start one: manage.py rqworker high default low"
                )
            )
            return
        counts = ", ".join(f"{n} {state}" for state, n in listing.counts.items() if n)
        self.stdout.write(f"{len(listing.workers)} worker(s): {counts}")
        if listing.hidden:
            self.stdout.write(
                self.style.NOTICE(f"{listing.hidden} more not shown (raise --limit).")
            )
        rows = [self.row(worker) for worker in listing.workers]
        headers = [
            "name",
            "host",
            "pid",
            "queues",
            "state",
            "current node",
            "since (UTC)",
            "last heartbeat (UTC)",
            "ok",
            "failed",
            "restarts",
        ]
        for line in _table(headers, rows, markdown=False):
            self.stdout.write(line)

    @staticmethod
    def row(worker: selector.Worker) -> list:
        current = worker.current
        if current is not None:
            node = f"run {current.run_id} {current.node_key} #{current.attempt}"
            if not current.running:
                node += f" ({current.node_status})"
        else:
            node = worker.current_job or "—"
        restarts = worker.restarts
        if restarts.count is None:
            restarts_text = "?"
        else:
            restarts_text = f"{restarts.count}" if restarts.exact else f">={restarts.count}"
        return [
            worker.name,
            worker.host,
            worker.pid or "",
            ",".join(worker.queues),
            worker.state.upper() if worker.state in ("dead", "unresponsive") else worker.state,
            node,
            _when(worker.since),
            _when(worker.last_heartbeat),
            worker.successful_jobs,
            worker.failed_jobs,
            restarts_text,
        ]
