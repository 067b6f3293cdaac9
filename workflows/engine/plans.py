"""Plans of the recovery transitions: what resume, retry, rollback, skip and mark
succeeded would change, read from the run's rows (locked or not) and changing nothing.

Operations preview a plan; ``recovery.recover`` plans, compensates, then plans again
under the run's lock and applies.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db.models import Max

from workflows.definitions import registry
from workflows.engine.common import EngineError
from workflows.models import Checkpoint, NodeRun, Run


class RecoveryError(EngineError):
    """The action cannot be applied to the run as it is; the message says what to do."""


@dataclass
class Plan:
    """What an operator action will change, as read from the run's rows."""

    action: str
    run: Run
    nodes: dict[str, NodeRun]
    # Nodes that go back to pending and run again.
    reset: list[str] = field(default_factory=list)
    # Of those, nodes that resume from their latest progress checkpoint (others start over).
    resume_from_checkpoint: set[str] = field(default_factory=set)
    # Checkpoints to drop: of the reset nodes, every checkpoint with an id above this.
    drop_checkpoints_after_id: int | None = None
    # Compensate hooks to run first, in this order (reverse completion order).
    compensate: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    succeed: dict[str, Any] = field(default_factory=dict)
    pause_after: bool = False  # rollback without resume: leave the run cancelled
    noop_message: str = ""

    @property
    def is_noop(self) -> bool:
        return bool(self.noop_message)

    def affected(self) -> list[str]:
        return [
            *self.compensate,
            *[k for k in self.reset if k not in self.compensate],
            *self.skip,
            *self.succeed,
        ]


# --- Planning (reads only) --------------------------------------------------------------------


def load_nodes(run: Run, *, lock: bool) -> dict[str, NodeRun]:
    queryset = NodeRun.objects.filter(run=run).order_by("id")
    if lock:
        queryset = queryset.select_for_update(no_key=True)
    return {node.node_key: node for node in queryset}


def descendants(nodes: dict[str, NodeRun], keys) -> list[str]:
    """Every node downstream of ``keys`` (not including them), in definition order."""
    found: set[str] = set()
    frontier = list(keys)
    while frontier:
        for child in nodes[frontier.pop()].downstream:
            if child not in found:
                found.add(child)
                frontier.append(child)
    return [key for key in nodes if key in found]


def _get_node(nodes: dict[str, NodeRun], key: str, run: Run) -> NodeRun:
    if key not in nodes:
        raise RecoveryError(
            f"Run {run.pk} has no node {key!r} (nodes: {', '.join(list(nodes)[:20])})."
        )
    return nodes[key]


def plan_resume(run: Run, nodes: dict[str, NodeRun]) -> Plan:
    plan = Plan("resume", run, nodes)
    if run.status == Run.Status.SUCCEEDED:
        plan.noop_message = f"Run {run.pk} already succeeded; nothing to resume."
    elif run.status in Run.ACTIVE:
        plan.noop_message = (
            f"Run {run.pk} is {run.status}; nothing to resume (retry a node instead)."
        )
    else:
        plan.reset = [key for key, node in nodes.items() if node.status not in NodeRun.DONE]
        plan.resume_from_checkpoint = set(plan.reset)
    return plan


def plan_retry(
    run: Run, nodes: dict[str, NodeRun], key: str, *, downstream: bool, expected_attempt=None
) -> Plan:
    node = _get_node(nodes, key, run)
    plan = Plan("retry", run, nodes)
    if expected_attempt is not None and node.attempt != expected_attempt:
        plan.noop_message = (
            f"Node {key} is at attempt {node.attempt}, not {expected_attempt}: it was retried or moved on "
            "since you looked; nothing changed."
        )
        return plan
    if node.status == NodeRun.Status.PENDING and node.pending_upstreams:
        blockers = [up for up in node.upstream if nodes[up].status not in NodeRun.DONE]
        raise RecoveryError(
            f"Node {key} has not run yet: it waits for {', '.join(blockers)}. Retry "
            f"{blockers[0]} (with its downstream) or resume the run instead."
        )
    plan.reset = [key]
    # A node that did not finish resumes from its checkpoint; a succeeded one starts over.
    if node.status != NodeRun.Status.SUCCEEDED:
        plan.resume_from_checkpoint = {key}
    if downstream:
        plan.reset += [k for k in descendants(nodes, [key]) if k not in plan.reset]
    return plan


def plan_rollback(
    run: Run,
    nodes: dict[str, NodeRun],
    *,
    checkpoint_id: int | None = None,
    node_key: str | None = None,
    resume: bool = True,
) -> Plan:
    """Back to a checkpoint, or to just before a node.

    1. Find the point: the checkpoint's id, or just before the node's first checkpoint.
    2. Nodes completed after the point (their node_done checkpoint is later) are
       compensated, newest first, and reset with everything downstream of them.
    3. Rolling back to a progress checkpoint of node X also resets X, which resumes
       from that checkpoint; "to just before X" resets X to start over.
    4. Every checkpoint of the reset nodes later than the point is dropped.
    """
    if (checkpoint_id is None) == (node_key is None):
        raise RecoveryError("Give exactly one of a checkpoint or a node to roll back to.")
    if run.status in Run.ACTIVE:
        raise RecoveryError(f"Run {run.pk} is still {run.status}; cancel it first, then roll back.")
    plan = Plan("rollback", run, nodes, pause_after=not resume)
    roots: list[str] = []
    if checkpoint_id is not None:
        checkpoint = (
            Checkpoint.objects.filter(pk=checkpoint_id, run=run).select_related("node_run").first()
        )
        if checkpoint is None:
            raise RecoveryError(
                f"Run {run.pk} has no checkpoint {checkpoint_id}; pick one from the run page."
            )
        point = checkpoint.pk
        if checkpoint.kind == Checkpoint.Kind.PROGRESS and checkpoint.node_run is not None:
            roots.append(checkpoint.node_run.node_key)
    else:
        node = _get_node(nodes, node_key, run)
        first = (
            Checkpoint.objects.filter(node_run=node)
            .order_by("pk")
            .values_list("pk", flat=True)
            .first()
        )
        newest = Checkpoint.objects.filter(run=run).aggregate(newest=Max("pk"))["newest"] or 0
        point = (first - 1) if first is not None else newest
        roots.append(node.node_key)
    completed_after = list(
        Checkpoint.objects.filter(
            run=run, kind=Checkpoint.Kind.NODE_DONE, pk__gt=point, node_run__isnull=False
        )
        .order_by("-pk")
        .values_list("node_run__node_key", flat=True)
    )
    completed_now = [
        key
        for key in dict.fromkeys(completed_after)
        if nodes[key].status == NodeRun.Status.SUCCEEDED
    ]
    plan.compensate = [
        key for key in completed_now if registry.get(nodes[key].node_type).compensate_func
    ]
    starts = list(dict.fromkeys([*roots, *completed_now]))
    plan.reset = [key for key in nodes if key in set(starts) | set(descendants(nodes, starts))]
    plan.drop_checkpoints_after_id = point
    plan.resume_from_checkpoint = set(plan.reset)  # from what is left after the drop
    if not plan.reset:
        plan.noop_message = "Nothing completed after that point; nothing to roll back."
    return plan


def plan_skip(run: Run, nodes: dict[str, NodeRun], key: str) -> Plan:
    node = _get_node(nodes, key, run)
    plan = Plan("skip", run, nodes)
    if node.status in NodeRun.DONE:
        plan.noop_message = f"Node {key} is already {node.status}; nothing to skip."
    else:
        plan.skip = [key]
    return plan


def plan_mark_succeeded(run: Run, nodes: dict[str, NodeRun], key: str, output) -> Plan:
    node = _get_node(nodes, key, run)
    plan = Plan("mark_succeeded", run, nodes)
    try:
        size = len(json.dumps(output))
    except (TypeError, ValueError) as error:
        raise RecoveryError(f"The output must be JSON: {error}") from None
    if size > settings.KEEL_MAX_OUTPUT_BYTES:
        raise RecoveryError(
            f"The output is {size} bytes, over KEEL_MAX_OUTPUT_BYTES={settings.KEEL_MAX_OUTPUT_BYTES}."
        )
    if node.status == NodeRun.Status.SUCCEEDED:
        plan.noop_message = f"Node {key} already succeeded; nothing to mark."
    else:
        plan.succeed = {key: output}
    return plan
