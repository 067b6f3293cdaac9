"""The heartbeat: a thread beside a running node that proves it is alive.

Every KEEL_HEARTBEAT_SECONDS it writes ``heartbeat_at``, the node's progress and a
resource sample (CPU %, RSS, IO wait), flushes buffered log lines, and learns whether
the attempt is still current — if it was cancelled or superseded, the node's
``should_stop()`` turns true.
"""

import logging
import os
import threading

import psutil
from django.conf import settings
from django.db import connection

from workflows import engine
from workflows.context import NodeContext

logger = logging.getLogger(__name__)
MAX_SAMPLES = 60


class ResourceSampler:
    def __init__(self):
        self.process = psutil.Process(os.getpid())
        # The first cpu_percent() call only sets the baseline.
        self.process.cpu_percent(None)
        psutil.cpu_times_percent(None)

    def sample(self) -> dict:
        with self.process.oneshot():
            cpu = self.process.cpu_percent(None)
            rss = self.process.memory_info().rss
        io_wait = getattr(psutil.cpu_times_percent(None), "iowait", None)
        return {"cpu_percent": round(cpu, 1), "rss_bytes": rss, "io_wait_percent": io_wait}


class Heartbeat(threading.Thread):
    def __init__(self, ctx: NodeContext, node_run_id: int, attempt: int):
        super().__init__(name=f"keel-heartbeat-{node_run_id}-{attempt}", daemon=True)
        self.ctx = ctx
        self.node_run_id = node_run_id
        self.attempt = attempt
        self.interval = settings.KEEL_HEARTBEAT_SECONDS
        self._stopped = threading.Event()
        self._samples: list[dict] = []
        # Made at the first beat: most nodes finish before one, and psutil costs ~0.4 ms.
        self._sampler: ResourceSampler | None = None

    def run(self) -> None:
        beaten = False
        try:
            while not self._stopped.wait(self.interval):
                beaten = True
                self.beat()
        finally:
            if beaten:
                # Django opens one connection per thread; this one dies with the thread.
                # (Most nodes end before the first beat, and never open one.)
                connection.close()

    def beat(self) -> None:
        try:
            if self._sampler is None:
                self._sampler = ResourceSampler()
            sample = self._sampler.sample()
            self._samples = [*self._samples, sample][-MAX_SAMPLES:]
            still_current = engine.record_heartbeat(
                self.node_run_id,
                self.attempt,
                progress=self.ctx.take_progress(),
                sample=sample,
                samples=self._samples,
            )
            self.ctx.flush_logs()
        except Exception:
            # A missed beat is what the watchdog looks for; never crash the node over it.
            logger.exception(
                "Heartbeat of node-run %s attempt %s failed", self.node_run_id, self.attempt
            )
            return
        if not still_current:
            self.ctx.request_stop()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=self.interval + 5)
