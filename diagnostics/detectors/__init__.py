"""Detectors: one small rule per cause of a stuck or failing node, or release (shared
DESIGN §6).

Each detector reads the database (and RQ/Redis where it must) through the tick's
``Context`` and returns ``Detection``s: the cause, plain words, evidence and the action
that fits. Detectors never change anything; the watchdog records their findings and
repairs what is safe (diagnostics/watchdog.py, diagnostics/repairs.py).

| module      | codes                                                                  |
|-------------|------------------------------------------------------------------------|
| nodes       | heartbeat_stale, worker_lost, job_lost, resource_pressure              |
| durations   | overdue, timeout_exceeded, stalled                                     |
| workers     | worker_unresponsive, zombie_attempt                                    |
| flow        | no_worker, backlog, pool_exhausted, blocked_upstream, repeated_timeout |
| stores      | redis_unhealthy, db_unhealthy                                          |
| deployments | retired_version_running, canary_failing, deployment_stuck              |
"""

from diagnostics.detectors import (  # noqa: F401  (registers the detectors)
    deployments,
    durations,
    flow,
    nodes,
    stores,
    workers,
)
from diagnostics.detectors.context import (
    DB_OUTAGE,
    REDIS_OUTAGE,
    Context,
    Liveness,
    WorkerInfo,
    process_state,
)
from diagnostics.detectors.nodes import lost_job_grace
from diagnostics.detectors.registry import DETECTORS, DetectionRun, run_all
from diagnostics.detectors.stores import database_problems

CODES = [each.code for each in DETECTORS]

__all__ = [
    "CODES",
    "DB_OUTAGE",
    "DETECTORS",
    "REDIS_OUTAGE",
    "Context",
    "DetectionRun",
    "Liveness",
    "WorkerInfo",
    "database_problems",
    "lost_job_grace",
    "process_state",
    "run_all",
]
