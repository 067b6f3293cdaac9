import gc
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from diagnostics import watchdog


class Command(BaseCommand):
    help = (
        "Run the watchdog: detect stuck nodes and unhealthy workers, queues and stores, record "
        "findings, and repair what is safe (lost workers and jobs, due retries, overdue runs)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Run one tick and exit.")
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="Seconds between ticks (default KEEL_WATCHDOG_SECONDS).",
        )

    def handle(self, *args, **options):
        # What was built at start stays out of later collections: a tick's objects (10 000
        # of them in a mass incident) are collected without scanning all of Django each
        # time, which made a tick's p95 a third above its median.
        gc.collect()
        gc.freeze()
        if options["once"]:
            self.stdout.write(str(watchdog.tick()))
            return
        interval = options["interval"] or settings.KEEL_WATCHDOG_SECONDS
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        self.stdout.write(f"watchdog: one tick every {interval:g}s (SIGTERM or Ctrl-C stops it)")
        failed_ticks = 0
        while not stopping.is_set():
            failed_ticks = 0 if self.run_tick(interval) else failed_ticks + 1
            close_old_connections()
            # While the database or Redis fails, wait a little longer between ticks.
            stopping.wait(watchdog.backoff(interval, failed_ticks))
        self.stdout.write(self.style.SUCCESS("watchdog stopped"))

    def run_tick(self, interval: float) -> bool:
        """One tick, reported in one line or a few; False when it could not do its work."""
        try:
            report = watchdog.tick(lock_seconds=max(30.0, interval * 5), interval=interval)
        except Exception as error:  # a failed tick must not end the loop
            self.stderr.write(f"watchdog tick failed: {error!r}")
            return False
        if report.acted and report.eventful:
            self.stdout.write(str(report))
        return not report.failed
