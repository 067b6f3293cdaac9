"""Operator actions on many runs at once: one preview, one reason, and each run through its
own audited operation, so that every run's history says who did what and why.

A bulk request carries one idempotency key; each run gets ``<key>:<run id>``, so sending the
same request twice (a double click, a retry) changes each run once.
"""

from dataclasses import dataclass, field

from workflows import actions, operations
from workflows.models import Run

BULK_LIMIT = 100
BULK_ACTIONS = ("resume", "cancel")


class BulkError(ValueError):
    pass


@dataclass
class BulkLine:
    """What the action would do to one run."""

    run: Run
    applies: bool
    will: str  # what happens, or why nothing does
    warnings: list[str] = field(default_factory=list)


@dataclass
class BulkResult:
    run_id: int
    changed: bool
    message: str


def action_for(name: str) -> actions.Action:
    if name not in BULK_ACTIONS:
        raise BulkError(f"No bulk action {name!r}; choose one of: {', '.join(BULK_ACTIONS)}.")
    return actions.get(name)


def chosen_runs(run_ids) -> list[Run]:
    """The runs asked for, in id order; every id must name a run."""
    ids = sorted(set(run_ids))
    if not ids:
        raise BulkError("Select at least one run.")
    if len(ids) > BULK_LIMIT:
        raise BulkError(f"Select at most {BULK_LIMIT} runs at once ({len(ids)} selected).")
    runs = list(Run.objects.filter(pk__in=ids).select_related("workflow", "version"))
    missing = sorted(set(ids) - {run.pk for run in runs})
    if missing:
        raise BulkError(f"No run {', '.join(map(str, missing))}: it was deleted or never existed.")
    return sorted(runs, key=lambda run: run.pk)


def preview(name: str, run_ids) -> list[BulkLine]:
    """What ``name`` would do to each run, without changing anything."""
    action = action_for(name)
    lines = []
    for run in chosen_runs(run_ids):
        try:
            seen = action.preview(run.pk)
        except operations.OperationError as problem:
            lines.append(BulkLine(run=run, applies=False, will=str(problem)))
            continue
        if seen.noop_message:
            lines.append(BulkLine(run=run, applies=False, will=seen.noop_message))
            continue
        changed = len(seen.nodes)
        will = f"{changed} node{'s' if changed != 1 else ''}: " + "; ".join(
            f"{node.key} {node.will}" for node in seen.nodes[:3]
        )
        if changed > 3:
            will += f"; and {changed - 3} more"
        lines.append(BulkLine(run=run, applies=True, will=will, warnings=seen.warnings))
    return lines


def apply(name: str, run_ids, *, actor, reason: str, request_key: str) -> list[BulkResult]:
    """Apply ``name`` to each run through its operation. A refusal of the actor's
    permission stops at the first run (and is recorded there, as every refusal is); a run
    the action no longer fits is reported and the others go on."""
    action = action_for(name)
    results = []
    for run in chosen_runs(run_ids):
        try:
            outcome = action.perform(
                run.pk, actor=actor, reason=reason, request_key=f"{request_key}:{run.pk}"
            )
        except operations.OperationDenied:
            raise
        except operations.OperationError as problem:
            results.append(BulkResult(run.pk, False, str(problem)))
        else:
            results.append(BulkResult(run.pk, outcome.changed, outcome.message))
    return results
