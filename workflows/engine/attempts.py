"""The worker's side of an attempt: claim it, beat, checkpoint, read what it needs."""

import logging
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from workflows.engine import statements
from workflows.engine.common import ENGINE
from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run, RunEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """What the process that claimed an attempt needs to run it."""

    node_run_id: int
    run_id: int
    attempt: int
    node_key: str
    node_type: str
    params: dict
    upstream: list
    timeout_seconds: int
    soft_timeout_seconds: int | None
    attempt_id: int


def claim_attempt(
    node_run_id: int, attempt: int, *, worker: str, pid: int, host: str
) -> Claim | None:
    """Compare-and-set ``queued`` → ``running`` for exactly this attempt, committed
    (``statements.claim``).

    Returns None when the message is stale (the node moved on, was cancelled, or this
    very message was already delivered); that is recorded, and nothing runs.
    """
    node = statements.claim(
        node_run_id, attempt, worker=worker, pid=pid, host=host, now=timezone.now()
    )
    if node is None:
        record_stale_message(node_run_id, attempt, worker, "claim")
        return None
    if node["attempt_id"] is None:  # its row was not queued (it always is): read its id
        node["attempt_id"] = (
            NodeAttempt.objects.filter(node_run_id=node_run_id, number=attempt)
            .values_list("pk", flat=True)
            .first()
        )
    return Claim(node_run_id=node_run_id, attempt=attempt, **node)


def note_attempt(node_run_id: int, attempt: int, note: str, *, actor: str) -> None:
    """Say in the run's history what happened to an attempt's process that is not a
    transition: its outcome waited for the database, or it was stopped once superseded."""
    run_id = NodeRun.objects.filter(pk=node_run_id).values_list("run_id", flat=True).first()
    if run_id is None:
        return
    RunEvent.objects.create(
        run_id=run_id,
        node_run_id=node_run_id,
        kind=RunEvent.Kind.TRANSITION,
        actor=actor,
        reason=note[:2000],
        before={"attempt": attempt},
    )


def attempt_is_running(node_run_id: int, attempt: int) -> bool:
    return NodeRun.objects.filter(
        pk=node_run_id, status=NodeRun.Status.RUNNING, attempt=attempt
    ).exists()


def run_params(run_id: int) -> dict:
    return Run.objects.values_list("params", flat=True).get(pk=run_id)


def record_stale_message(node_run_id: int, attempt: int, worker: str, what: str) -> None:
    row = NodeRun.objects.filter(pk=node_run_id).values("run_id", "status", "attempt").first()
    if row is None:
        logger.warning(
            "Ignoring %s for node-run %s attempt %s: no such node-run.", what, node_run_id, attempt
        )
        return
    logger.info(
        "Ignoring stale %s for node-run %s attempt %s (node is %s, attempt %s).",
        what,
        node_run_id,
        attempt,
        row["status"],
        row["attempt"],
    )
    RunEvent.objects.create(
        run_id=row["run_id"],
        node_run_id=node_run_id,
        kind=RunEvent.Kind.STALE,
        actor=worker or ENGINE,
        reason=(
            f"rejected {what} of attempt {attempt}: the node is {row['status']} "
            f"at attempt {row['attempt']}"
        ),
        before={"attempt": attempt},
        after={"status": row["status"], "attempt": row["attempt"]},
    )


def record_heartbeat(
    node_run_id: int,
    attempt: int,
    *,
    progress=None,
    progress_at=None,
    sample=None,
    samples=None,
) -> bool:
    """Write heartbeat_at (and progress with when it last moved, resource samples) if the
    attempt is still current.

    Returns False when it is not (cancelled, superseded): the node should stop.
    """
    now = timezone.now()
    fields = {"heartbeat_at": now, "updated_at": now}
    if progress is not None:
        fields["progress"] = progress
        fields["progress_at"] = progress_at or now
    current = NodeRun.objects.filter(
        pk=node_run_id, status=NodeRun.Status.RUNNING, attempt=attempt
    ).update(**fields)
    if current and sample:
        NodeAttempt.objects.filter(node_run_id=node_run_id, number=attempt).update(
            cpu_percent=sample.get("cpu_percent"),
            rss_bytes=sample.get("rss_bytes"),
            io_wait_percent=sample.get("io_wait_percent"),
            resource_samples=samples or [sample],
            updated_at=now,
        )
    return bool(current)


class AttemptSuperseded(BaseException):
    """This attempt is no longer current (cancelled, timed out, or re-queued).

    A BaseException so that a node's ``except Exception`` does not swallow it: the
    attempt must stop without writing anything more.
    """


def save_progress_checkpoint(
    node_run_id: int, run_id: int, attempt: int, sequence: int, state
) -> Checkpoint:
    """Store a node's resume state, only while its attempt is current.

    Runs in its own savepoint: called inside the node's own ``transaction.atomic()``,
    the checkpoint commits or rolls back together with the node's writes.
    """
    now = timezone.now()
    with transaction.atomic():
        current = NodeRun.objects.filter(
            pk=node_run_id, status=NodeRun.Status.RUNNING, attempt=attempt
        ).update(heartbeat_at=now, updated_at=now)
        if not current:
            raise AttemptSuperseded(
                f"node-run {node_run_id} attempt {attempt} is no longer current"
            )
        return Checkpoint.objects.create(
            run_id=run_id,
            node_run_id=node_run_id,
            kind=Checkpoint.Kind.PROGRESS,
            sequence=sequence,
            attempt=attempt,
            state=state,
        )


def next_checkpoint_sequence(node_run_id: int) -> int:
    last = Checkpoint.objects.filter(node_run_id=node_run_id).aggregate(last=Max("sequence"))[
        "last"
    ]
    return (last or 0) + 1


def latest_progress_state(node_run_id: int):
    checkpoint = (
        Checkpoint.objects.filter(node_run_id=node_run_id, kind=Checkpoint.Kind.PROGRESS)
        .order_by("-sequence")
        .only("state")
        .first()
    )
    return checkpoint.state if checkpoint else None


def upstream_outputs(run_id: int, keys: list[str]) -> dict:
    if not keys:
        return {}
    return dict(
        NodeRun.objects.filter(run_id=run_id, node_key__in=keys).values_list("node_key", "output")
    )
