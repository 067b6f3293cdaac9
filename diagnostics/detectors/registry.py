"""The detector registry: ``@detector(code)`` and ``run_all``, which runs them all."""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import redis
from django.db import DatabaseError
from django.db.models import Q

from diagnostics.detectors.context import Context
from diagnostics.findings import Detection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detector:
    code: str
    func: Callable[[Context], list[Detection]]
    needs_redis: bool
    # For detectors about running attempts: the SQL condition on NodeRun (a running node's
    # started_at is its current attempt's) that holds for every node whose attempt the
    # detector may report, so that healthy ones are never loaded.
    suspects: Callable[[Context], Q] | None = None


DETECTORS: list[Detector] = []


def detector(code: str, *, needs_redis: bool = False, suspects=None):
    def register(func):
        DETECTORS.append(Detector(code, func, needs_redis, suspects))
        return func

    return register


@dataclass
class DetectionRun:
    detections: list[Detection]
    checked: set[str]
    failed: dict[str, str]
    # (code, subject) of open findings a detector could not look at this time.
    keep_open: set[tuple[str, str]]


def run_all(ctx: Context, codes: set[str] | None = None) -> DetectionRun:
    """Run every detector (or those of ``codes``). A detector that cannot run (Redis down,
    an error) is reported in ``failed`` and its open findings are left alone."""
    detections, checked, failed = [], set(), {}
    chosen = []
    for each in DETECTORS:
        if codes is not None and each.code not in codes:
            continue
        if each.needs_redis and not ctx.redis_ok:
            failed[each.code] = f"Redis did not answer ({ctx.redis_error})"
            continue
        chosen.append(each)
    if any(each.needs_redis for each in chosen):
        ctx.start_worker_sweep()
    for each in [each for each in chosen if each.suspects]:
        try:
            ctx.suspect_conditions.append(each.suspects(ctx))
        except (DatabaseError, redis.RedisError) as error:
            logger.exception("Detector %s could not choose its suspects", each.code)
            failed[each.code] = f"{type(error).__name__}: {error}"
            chosen.remove(each)
    # Those that read Redis last: the others ask the database while Redis runs the
    # worker sweep (~30 ms at 10 000 workers).
    for each in sorted(chosen, key=lambda each: each.needs_redis):
        ctx.between_steps()
        try:
            found = each.func(ctx)
        except (DatabaseError, redis.RedisError, psutil.Error, OSError) as error:
            logger.exception("Detector %s failed", each.code)
            failed[each.code] = f"{type(error).__name__}: {error}"
            continue
        detections.extend(found)
        checked.add(each.code)
    return DetectionRun(detections, checked, failed, ctx.keep_open)
