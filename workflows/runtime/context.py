"""``ctx``: what a node sees while it runs (shared DESIGN §4)."""

import json
import logging
import threading
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from workflows import engine
from workflows.models import LogLine
from workflows.runtime import outages

_UNSET = object()


class NodeContext:
    def __init__(self, claim: engine.Claim, *, started_monotonic: float | None = None):
        self._claim = claim
        self.params = claim.params
        self.attempt = claim.attempt
        self.node_key = claim.node_key
        self.run_id = claim.run_id
        self.idempotency_key = f"keel-run{claim.run_id}-{claim.node_key}"
        self._started = started_monotonic if started_monotonic is not None else time.monotonic()
        self.deadline = timezone.now() + timedelta(seconds=claim.timeout_seconds)
        self._inputs = _UNSET
        self._run_params = _UNSET
        self._checkpoint_state = _UNSET
        self._next_sequence = None
        self._progress = None
        self._progress_dirty = False
        self._progress_moved_at = None
        self._stop_requested = threading.Event()
        self._log: logging.Logger | None = None

    # --- what the node reads --------------------------------------------------------------

    @property
    def inputs(self) -> dict:
        """Outputs of the upstream nodes, by node key (read once, when first asked for)."""
        if self._inputs is _UNSET:
            self._inputs = self._through_outage(
                lambda: engine.upstream_outputs(self.run_id, self._claim.upstream), "inputs"
            )
        return self._inputs

    @property
    def log(self) -> logging.Logger:
        """The attempt's logger: its lines are kept as LogLine rows (bounded)."""
        if self._log is None:  # made when first used: most nodes never log
            self._log = _attempt_logger(self._claim)
        return self._log

    @property
    def run_params(self) -> dict:
        """The run's params (read once, when first asked for)."""
        if self._run_params is _UNSET:
            self._run_params = self._through_outage(
                lambda: engine.run_params(self.run_id), "run params"
            )
        return self._run_params

    @property
    def checkpoint_state(self):
        """The state of this node's latest checkpoint from any attempt, or None."""
        if self._checkpoint_state is _UNSET:
            self._checkpoint_state = self._through_outage(
                lambda: engine.latest_progress_state(self._claim.node_run_id), "checkpoint"
            )
        return self._checkpoint_state

    def should_stop(self) -> bool:
        """True after the soft timeout, or once the attempt was cancelled or superseded."""
        soft = self._claim.soft_timeout_seconds
        if soft is not None and time.monotonic() - self._started >= soft:
            return True
        return self._stop_requested.is_set()

    # --- what the node writes -------------------------------------------------------------

    def checkpoint(self, state) -> None:
        """Durably save where to resume from; also a heartbeat.

        Call it inside your own ``transaction.atomic()`` together with the writes it
        describes, and the two commit or roll back as one: exactly-once results.
        """
        _check_json(state, "checkpoint state")
        if self._next_sequence is None:
            self._next_sequence = self._through_outage(
                lambda: engine.next_checkpoint_sequence(self._claim.node_run_id), "checkpoints"
            )
        self._through_outage(
            lambda: engine.save_progress_checkpoint(
                self._claim.node_run_id, self.run_id, self.attempt, self._next_sequence, state
            ),
            "checkpoint",
        )
        self._next_sequence += 1
        # Visible to this attempt only once committed, but the node holds it already.
        self._checkpoint_state = state

    def progress(self, done, total=None, message: str = "") -> None:
        """Report progress; written with the next heartbeat."""
        before = self._progress or {}
        if (before.get("done"), before.get("total")) != (done, total) or not before:
            # Only a change of done or total restarts the watchdog's stall clock.
            self._progress_moved_at = timezone.now()
        self._progress = {"done": done, "total": total, "message": str(message)[:200]}
        self._progress_dirty = True

    # --- used by the executor -------------------------------------------------------------

    def _through_outage(self, action, what: str):
        """``action()``, retried through a database outage unless the node's own transaction
        is open: that one is lost with the connection, so the error reaches the node (and
        the attempt, if the node lets it, is retried from its last checkpoint)."""
        if connection.in_atomic_block:
            return action()
        result, _ = outages.retry(action, what=f"read or write the node's {what}")
        return result

    def request_stop(self) -> None:
        self._stop_requested.set()

    def flush_logs(self, final: bool = False) -> None:
        """Write buffered log lines (the heartbeat does it; the executor at the end)."""
        if self._log is not None:
            self._log.handlers[0].flush_to_db(final=final)

    def take_progress(self) -> tuple[dict | None, datetime | None]:
        """The progress reported since the last beat (or None), and when it last moved."""
        if not self._progress_dirty:
            return None, None
        self._progress_dirty = False
        return self._progress, self._progress_moved_at


def _check_json(value, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be JSON-serialisable: {error}") from None


class AttemptLogHandler(logging.Handler):
    """Buffers an attempt's log records and writes them as LogLine rows, bounded."""

    def __init__(self, attempt_id: int):
        super().__init__()
        self.attempt_id = attempt_id
        self.max_lines = settings.KEEL_MAX_LOG_LINES
        self.max_chars = settings.KEEL_MAX_LOG_LINE_CHARS
        self._buffer: list[LogLine] = []
        self._seq = 0
        self._dropped = 0
        self._buffer_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # a bad format string in a node must not kill the node
            message = str(record.msg)
        with self._buffer_lock:
            if self._seq >= self.max_lines:
                self._dropped += 1
                return
            self._seq += 1
            self._buffer.append(
                LogLine(
                    attempt_id=self.attempt_id,
                    seq=self._seq,
                    at=timezone.now(),
                    level=record.levelname,
                    message=message[: self.max_chars],
                )
            )

    def flush_to_db(self, final: bool = False) -> None:
        with self._buffer_lock:
            lines, self._buffer = self._buffer, []
            if final and self._dropped:
                lines.append(
                    LogLine(
                        attempt_id=self.attempt_id,
                        seq=self._seq + 1,
                        at=timezone.now(),
                        level="WARNING",
                        message=f"log truncated: {self._dropped} more line(s) dropped "
                        f"(KEEL_MAX_LOG_LINES={self.max_lines})",
                    )
                )
                self._dropped = 0
                self._seq += 1
        if lines:
            with transaction.atomic():
                LogLine.objects.bulk_create(lines)


def _attempt_logger(claim: engine.Claim) -> logging.Logger:
    # A Logger made directly, not via getLogger: it is not kept in logging's global
    # registry, so one per attempt does not leak in a long-lived worker.
    logger = logging.Logger(f"keel.node.{claim.node_key}", level=logging.DEBUG)
    logger.propagate = False
    handler = AttemptLogHandler(claim.attempt_id)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger
