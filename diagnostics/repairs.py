"""Repairs the watchdog makes on its own: only those that cannot lose or double work.

* ``abandon``: the process running an attempt is gone (worker lost, or job lost and the
  worker silent). ``engine.abandon_attempt`` ends the attempt — a compare-and-set on the
  attempt number, so a repair based on a stale view, or made by a second watchdog,
  changes nothing — and the retry policy runs the node again from its last checkpoint.
* ``resend``: a queued node whose RQ job is gone or ended unrun. The dead job is
  dropped and ``engine.resend_lost_messages`` sends the same message (same job id)
  again; the claim's compare-and-set lets only one delivery run the node.

Each repair is written on its finding (``repaired_at``, ``repair``) and in the run's
history.
"""

import logging
import time
from dataclasses import dataclass, field

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from diagnostics import findings
from diagnostics.findings import Detection
from diagnostics.models import Finding
from workflows import engine
from workflows.models import NodeRun
from workflows.runtime import dispatch

logger = logging.getLogger(__name__)


# A tick spends at most this long ending lost attempts (each is its own transaction, a few
# ms); the rest wait for the next tick, so a mass incident (10 000 lost at once) is
# repaired over several ticks that each keep their lock, instead of one that outlives it.
REPAIR_SECONDS = 10.0


@dataclass
class RepairReport:
    abandoned: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    left: int = 0  # lost attempts left for the next tick (out of time)

    @property
    def count(self) -> int:
        return len(self.abandoned) + len(self.resent)


def abandon_lost_attempts(
    detections: list[Detection],
    by_key: dict[tuple[str, str], Finding],
    report: RepairReport,
    *,
    between=lambda: None,
) -> None:
    """End each attempt whose process is gone and let the retry policy act, for up to
    REPAIR_SECONDS (one at least); ``between`` runs before each (the watchdog keeps its
    lock with it)."""
    done: set[tuple[int, int]] = set()
    deadline = time.monotonic() + REPAIR_SECONDS
    for detection in detections:
        repair = detection.repair
        if repair is None or repair.kind != "abandon":
            continue
        target = (repair.node_run_id, repair.attempt)
        if target in done:
            continue
        if done and time.monotonic() > deadline:
            report.left += 1
            continue
        done.add(target)
        between()
        if not engine.abandon_attempt(
            repair.node_run_id, repair.attempt, reason=repair.reason, actor=findings.ACTOR
        ):
            continue  # it finished, or someone else moved it on: nothing to repair
        words = (
            f"ended attempt {repair.attempt} ({repair.reason}); {_what_next(repair.node_run_id)}"
        )
        finding = by_key.get(detection.key)
        if finding is not None:
            findings.mark_repaired(finding, words)
        report.abandoned.append(words)


def _what_next(node_run_id: int) -> str:
    node = NodeRun.objects.only("status", "attempt", "max_attempts", "retry_at").get(pk=node_run_id)
    if node.status == NodeRun.Status.QUEUED:
        return f"attempt {node.attempt} of {node.max_attempts} queued"
    if node.status == NodeRun.Status.RETRY_WAIT:
        when = node.retry_at.isoformat() if node.retry_at else "soon"
        return f"attempt {node.attempt + 1} of {node.max_attempts} due at {when}"
    if node.status == NodeRun.Status.PENDING:
        return f"attempt {node.attempt + 1} waits for a pool slot"
    return f"the node is {node.status}: no attempts left"


def drop_dead_jobs(detections: list[Detection]) -> None:
    """Delete RQ jobs that ended without running their queued node, so the re-send sees
    them as missing (the re-sent job has the same id)."""
    connection = dispatch.redis_connection()
    for detection in detections:
        repair = detection.repair
        if repair is None or repair.kind != "resend" or not repair.dead_job:
            continue
        try:
            Job.fetch(repair.job_id, connection=connection, serializer=JSONSerializer).delete(
                remove_from_queue=True
            )
        except NoSuchJobError:
            continue
        except redis.RedisError as error:
            logger.warning("Could not drop dead job %s: %s", repair.job_id, error)
            return


def confirm_resent(
    detections: list[Detection], by_key: dict[tuple[str, str], Finding], report: RepairReport
) -> None:
    """After ``engine.resend_lost_messages``: note each lost job that is back in RQ."""
    wanted = [
        d
        for d in detections
        if d.repair is not None and d.repair.kind == "resend" and d.key in by_key
    ]
    if not wanted:
        return
    still_missing = dispatch.missing_jobs([d.repair.job_id for d in wanted])
    for detection in wanted:
        repair = detection.repair
        finding = by_key[detection.key]
        if repair.job_id in still_missing:
            continue
        words = f"sent job {repair.job_id} to queue {detection.queue} again"
        findings.mark_repaired(finding, words)
        report.resent.append(words)
