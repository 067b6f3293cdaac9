"""The heartbeat: a thread beside a running node that proves it is alive.

Every KEEL_HEARTBEAT_SECONDS it writes ``heartbeat_at``, the node's progress and a
resource sample (CPU %, RSS, IO wait), flushes buffered log lines, and learns whether
the attempt is still current — if it was cancelled or superseded, the node's
``should_stop()`` turns true.

One thread per process beats for whichever attempt the process runs (``watch`` /
``unwatch``), started the first time it is needed: a simple worker runs thousands of
nodes one after another, and starting and joining a thread for each cost about 0.15 ms,
a tenth of what Keel adds to a no-op node. A forking worker's horse starts its own.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import psutil
from django.conf import settings
from django.db import connection

from workflows import engine
from workflows.runtime.context import NodeContext

logger = logging.getLogger(__name__)
MAX_SAMPLES = 60


class ResourceSampler:
    """RSS, IO wait and network traffic by psutil; CPU from the process's own clock
    (``_Watched.cpu_percent``). IO wait and network are the host's: psutil cannot tell one
    process's network bytes apart without privileges."""

    def __init__(self):
        self.process = psutil.Process(os.getpid())
        # The first calls only set the baselines.
        psutil.cpu_times_percent(None)
        self._network = self._network_mark()

    @staticmethod
    def _network_mark() -> tuple[int, float] | None:
        counters = psutil.net_io_counters()
        if counters is None:  # no network interface to read
            return None
        return counters.bytes_sent + counters.bytes_recv, time.monotonic()

    def sample(self, cpu_percent: float) -> dict:
        rss = self.process.memory_info().rss
        io_wait = getattr(psutil.cpu_times_percent(None), "iowait", None)
        before, self._network = self._network, self._network_mark()
        network = None
        if before is not None and self._network is not None:
            moved, seconds = self._network[0] - before[0], self._network[1] - before[1]
            network = round(max(moved, 0) / max(seconds, 1e-6))
        return {
            "cpu_percent": round(cpu_percent, 1),
            "rss_bytes": rss,
            "io_wait_percent": io_wait,
            "network_bytes_per_second": network,
        }


def _clocks() -> tuple[float, float]:
    return time.process_time(), time.monotonic()


@dataclass
class _Watched:
    ctx: NodeContext
    node_run_id: int
    attempt: int
    next_beat: float
    samples: list = field(default_factory=list)
    # The process's CPU time and the wall clock at the last sample (or the watch): a
    # first sample measures the attempt's own first interval, not zero.
    cpu_mark: tuple[float, float] = field(default_factory=_clocks)

    def cpu_percent(self) -> float:
        (cpu_then, wall_then), (cpu_now, wall_now) = self.cpu_mark, _clocks()
        self.cpu_mark = (cpu_now, wall_now)
        return 100.0 * (cpu_now - cpu_then) / max(wall_now - wall_then, 1e-6)


class Heartbeat:
    """Beats for the attempt this process runs, if it runs long enough to need a beat."""

    def __init__(self):
        self.interval = settings.KEEL_HEARTBEAT_SECONDS
        self._changed = threading.Condition()
        self._watched: _Watched | None = None
        # Held while a beat writes: ``unwatch`` waits for it, so no beat of an attempt
        # is written once the attempt's outcome may be.
        self._beating = threading.Lock()
        self._thread: threading.Thread | None = None
        # Made at the first beat: most nodes finish before one, and psutil costs ~0.4 ms.
        self._sampler: ResourceSampler | None = None

    def watch(self, ctx: NodeContext, node_run_id: int, attempt: int) -> None:
        """Beat for this attempt from one interval from now on."""
        with self._changed:
            self._watched = _Watched(ctx, node_run_id, attempt, time.monotonic() + self.interval)
            self._changed.notify()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="keel-heartbeat", daemon=True)
            self._thread.start()

    def unwatch(self) -> None:
        """Stop beating for the attempt; returns once no beat of it is being written."""
        with self._changed:
            self._watched = None
        with self._beating:
            pass

    def _run(self) -> None:
        while True:
            with self._changed:
                watched = self._watched
                while watched is None or time.monotonic() < watched.next_beat:
                    timeout = None if watched is None else watched.next_beat - time.monotonic()
                    self._changed.wait(timeout)
                    watched = self._watched
                self._beating.acquire()
            try:
                if self._watched is watched:  # not unwatched meanwhile
                    watched.next_beat = time.monotonic() + self.interval
                    self._beat(watched)
            finally:
                self._beating.release()

    def _beat(self, watched: _Watched) -> None:
        try:
            if self._sampler is None:
                self._sampler = ResourceSampler()
            sample = self._sampler.sample(watched.cpu_percent())
            watched.samples = [*watched.samples, sample][-MAX_SAMPLES:]
            progress, progress_at = watched.ctx.take_progress()
            still_current = engine.record_heartbeat(
                watched.node_run_id,
                watched.attempt,
                progress=progress,
                progress_at=progress_at,
                sample=sample,
                samples=watched.samples,
            )
            watched.ctx.flush_logs()
        except Exception:
            # A missed beat is what the watchdog looks for; never crash the node over it.
            logger.exception(
                "Heartbeat of node-run %s attempt %s failed", watched.node_run_id, watched.attempt
            )
            return
        finally:
            # Django opens a connection per thread. Closed after each beat, one is never
            # left half-used when a work horse exits (os._exit) or stale between nodes;
            # opening one every few seconds costs little.
            connection.close()
        if not still_current:
            watched.ctx.request_stop()


_heartbeats: dict[int, Heartbeat] = {}


def for_this_process() -> Heartbeat:
    """This process's heartbeat (a forked horse gets its own: threads do not survive a fork)."""
    pid = os.getpid()
    if pid not in _heartbeats:
        _heartbeats.clear()
        _heartbeats[pid] = Heartbeat()
    return _heartbeats[pid]
