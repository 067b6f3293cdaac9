"""The engine: every state transition of runs and node runs, recovery included.

Runtime, watchdog and operations call these functions; nothing else writes a run's or
a node's status. Modules: ``runs`` (start, close, cancel, expire), ``attempts`` (claim,
heartbeats, checkpoints), ``outcomes`` (success, failure, abandon, retries),
``stops`` (an operator stops a running node), ``queueing`` (queue or wait for a pool
slot), ``plans`` (what resume, retry, rollback, skip and mark succeeded would change),
``compensation`` (a rollback's compensate hooks), ``recovery`` (``recover``: compensate,
lock, plan again, apply), ``sweeps`` (what the watchdog runs each tick), ``statements``
(the claim's and the success's named statements), ``common`` (lock order, errors). Jobs
go to RQ only after commit (``workflows.runtime.dispatch``).
"""

from workflows.engine.attempts import (
    AttemptSuperseded,
    Claim,
    attempt_is_running,
    claim_attempt,
    latest_progress_state,
    next_checkpoint_sequence,
    note_attempt,
    record_heartbeat,
    run_params,
    save_progress_checkpoint,
    upstream_outputs,
)
from workflows.engine.common import ENGINE, EngineError, RunParamsError, lock_pools
from workflows.engine.outcomes import (
    Failure,
    abandon_attempt,
    backoff_delay,
    complete_attempt,
    fail_attempt,
)
from workflows.engine.plans import (
    Plan,
    RecoveryError,
    load_nodes,
    plan_mark_succeeded,
    plan_resume,
    plan_retry,
    plan_rollback,
    plan_skip,
)
from workflows.engine.queueing import fill_pool, queue_or_wait
from workflows.engine.recovery import Recovered, recover
from workflows.engine.runs import (
    cancel_run,
    close_run_if_done,
    expire_run,
    resolve_run_params,
    start_run,
)
from workflows.engine.stops import Stopped, stop_node, why_not_stoppable
from workflows.engine.sweeps import (
    expire_overdue_runs,
    fail_pool_timeouts,
    promote_due_retries,
    resend_lost_messages,
)

__all__ = [
    "ENGINE",
    "AttemptSuperseded",
    "Claim",
    "EngineError",
    "Failure",
    "Plan",
    "Recovered",
    "RecoveryError",
    "RunParamsError",
    "Stopped",
    "abandon_attempt",
    "attempt_is_running",
    "backoff_delay",
    "cancel_run",
    "claim_attempt",
    "close_run_if_done",
    "complete_attempt",
    "expire_overdue_runs",
    "expire_run",
    "fail_attempt",
    "fail_pool_timeouts",
    "fill_pool",
    "latest_progress_state",
    "load_nodes",
    "lock_pools",
    "next_checkpoint_sequence",
    "note_attempt",
    "plan_mark_succeeded",
    "plan_resume",
    "plan_retry",
    "plan_rollback",
    "plan_skip",
    "promote_due_retries",
    "queue_or_wait",
    "record_heartbeat",
    "recover",
    "resend_lost_messages",
    "resolve_run_params",
    "run_params",
    "save_progress_checkpoint",
    "start_run",
    "stop_node",
    "upstream_outputs",
    "why_not_stoppable",
]
