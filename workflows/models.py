"""Keel's data model: the database is the truth (see shared DESIGN §2).

State changes never happen here: they go through workflows/engine/. Models hold
fields, constraints and the indexes the engine and the watchdog query by.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse


class Workflow(models.Model):
    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self):
        return self.slug

    def get_absolute_url(self):
        return reverse("dashboard:workflow-detail", args=[self.slug])


class WorkflowVersion(models.Model):
    """One immutable version of a definition. Runs are pinned to it forever."""

    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    spec = models.JSONField(help_text="The validated, normalised definition.")
    source = models.TextField(help_text="The definition as it was loaded (YAML or JSON).")
    checksum = models.CharField(max_length=64, help_text="SHA-256 of the normalised spec.")
    created_by = models.CharField(max_length=150)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["workflow", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "number"], name="version_number_unique"),
        ]

    def __str__(self):
        return f"{self.workflow.slug} v{self.number}"


class DeploymentStrategy(models.TextChoices):
    IMMEDIATE = "immediate"
    CANARY = "canary"
    BLUE_GREEN = "blue_green"


class DeploymentState(models.TextChoices):
    VALIDATING = "validating"  # blue-green: a validation run; new runs stay on the baseline
    RAMPING = "ramping"  # canary: a share of new runs, step by step
    ACTIVE = "active"  # every new run (at most one per workflow)
    SUPERSEDED = "superseded"  # was active; a later deployment took over
    ABORTED = "aborted"  # never became active: its canary or validation failed, or an operator
    ROLLED_BACK = "rolled_back"  # was active; an operator went back to an earlier version


class Deployment(models.Model):
    """Which version new runs of a workflow get. Runs stay pinned to the version they
    started on; a deployment only decides for new ones (workflows/deployments/)."""

    Strategy = DeploymentStrategy
    State = DeploymentState
    IN_FLIGHT = frozenset({State.VALIDATING, State.RAMPING})
    LIVE = frozenset({State.VALIDATING, State.RAMPING, State.ACTIVE})

    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="deployments")
    version = models.ForeignKey(
        WorkflowVersion, on_delete=models.PROTECT, related_name="deployments"
    )
    baseline = models.ForeignKey(
        WorkflowVersion,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="The version new runs got before; a canary is compared with it.",
    )
    strategy = models.CharField(max_length=16, choices=Strategy.choices)
    state = models.CharField(max_length=16, choices=State.choices)
    steps = models.JSONField(
        default=list, blank=True, help_text="Canary: the share of new runs at each step, in %."
    )
    step = models.PositiveSmallIntegerField(default=0, help_text="Canary: the current step.")
    step_started_at = models.DateTimeField(null=True, blank=True)
    routed = models.PositiveIntegerField(
        default=0, help_text="Canary: new runs routed in the current step (the split's counter)."
    )
    min_runs = models.PositiveIntegerField(
        default=20, help_text="Canary: finished canary runs a step needs before it is judged."
    )
    key_param = models.CharField(
        max_length=100,
        blank=True,
        help_text="Canary: a run parameter whose value keeps a key on one version (sticky).",
    )
    validation_run = models.ForeignKey(
        "Run", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    retire_baseline_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Blue-green: until then the previous version is the instant rollback target.",
    )
    actor = models.CharField(max_length=150)
    reason = models.TextField(blank=True)
    evidence = models.JSONField(
        default=dict, blank=True, help_text="The last canary analysis or validation outcome."
    )
    outcome = models.TextField(blank=True, help_text="Why the deployment ended as it did.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(state__in=DeploymentState.values), name="deployment_state_valid"
            ),
            models.CheckConstraint(
                condition=Q(strategy__in=DeploymentStrategy.values),
                name="deployment_strategy_valid",
            ),
            # Guarded transitions: two clicks can never make two live deployments.
            models.UniqueConstraint(
                fields=["workflow"],
                condition=Q(state=DeploymentState.ACTIVE),
                name="deployment_one_active",
            ),
            models.UniqueConstraint(
                fields=["workflow"],
                condition=Q(state__in=[DeploymentState.VALIDATING, DeploymentState.RAMPING]),
                name="deployment_one_in_flight",
            ),
        ]
        indexes = [
            # The watchdog's sweep of deployments in flight.
            models.Index(
                fields=["state"],
                name="deployment_in_flight",
                condition=Q(state__in=[DeploymentState.VALIDATING, DeploymentState.RAMPING]),
            ),
        ]

    def __str__(self):
        return f"{self.workflow.slug} v{self.version.number} {self.strategy} ({self.state})"

    @property
    def percent(self) -> int:
        """The canary's share of new runs now (100 once active)."""
        if self.state == self.State.ACTIVE:
            return 100
        if self.state == self.State.RAMPING and self.steps:
            return int(self.steps[min(self.step, len(self.steps) - 1)])
        return 0


class RunStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunPriority(models.TextChoices):
    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"


class RunQuerySet(models.QuerySet):
    def with_version(self):
        """Runs with their workflow and version, the version's definition left in the
        database: lists show a version by number, and a 1 000-node definition is ~100 KB
        of JSON per row (50 of them took the admin's run list 77 ms to decode)."""
        return self.select_related("workflow", "version").defer("version__spec", "version__source")


class Run(models.Model):
    Status = RunStatus

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
    ACTIVE = frozenset({Status.PENDING, Status.RUNNING})

    Priority = RunPriority

    # Indexed by run_workflow_id (and the other run_workflow_* indexes), which start with it.
    workflow = models.ForeignKey(
        Workflow, on_delete=models.PROTECT, related_name="runs", db_index=False
    )
    version = models.ForeignKey(WorkflowVersion, on_delete=models.PROTECT, related_name="runs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    params = models.JSONField(default=dict, blank=True)
    trigger = models.CharField(max_length=150, help_text="Who or what started the run.")
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.DEFAULT)
    reason = models.TextField(blank=True, help_text="Why the run failed or was cancelled.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Kept when the run is resumed and succeeds: the reliability figures count the failure.
    first_failed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the run first failed (kept after a resume)."
    )
    deadline = models.DateTimeField(null=True, blank=True)
    pools = models.JSONField(
        default=list, blank=True, help_text="Pools the run's nodes use, locked in name order."
    )
    deployment = models.ForeignKey(
        Deployment,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="runs",
        help_text="The deployment that chose this run's version.",
    )
    restarted_from = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="restarts",
        help_text="The run of a rolled-back version this run started again.",
    )

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [("operate_run", "Can resume, retry, roll back, skip, mark and cancel runs")]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=RunStatus.values), name="run_status_valid"
            ),
        ]
        indexes = [
            # Run lists filtered by workflow, newest first.
            models.Index(fields=["workflow", "-created_at"], name="run_workflow_created"),
            # In place of the foreign key's own index: the dashboard's runs list filtered by
            # workflow (keyset on id), and a workflow's run ids without reading the table
            # (the reliability figures' findings).
            models.Index(fields=["workflow", "-id"], name="run_workflow_id"),
            # Run lists filtered by status; the overview's counts.
            models.Index(fields=["status", "-created_at"], name="run_status_created"),
            # The watchdog's "runs past their deadline" sweep reads only live runs.
            models.Index(
                fields=["deadline"], name="run_live_deadline", condition=Q(status="running")
            ),
            # /metrics (diagnostics.metrics): runs that finished in the last hour.
            models.Index(fields=["finished_at"], name="run_finished"),
            # GET /api/v1/runs: every run, newest first, paged by (created_at, id) cursor.
            models.Index(fields=["-created_at", "-id"], name="run_created"),
            # The workflow page's reliability (diagnostics.reliability): a workflow's runs
            # finished in a window, newest first, with their status, from the index alone.
            models.Index(
                fields=["workflow", "-finished_at", "status"],
                name="run_workflow_finished",
                condition=Q(finished_at__isnull=False),
            ),
            # The workflow page's reliability: a workflow's runs that failed in a window,
            # resumed or not, and for each the next success (one seek each, however many
            # runs of a flaky workflow fail in a row).
            models.Index(
                fields=["workflow", "first_failed_at"],
                name="run_workflow_failed",
                condition=Q(first_failed_at__isnull=False),
            ),
            models.Index(
                fields=["workflow", "finished_at"],
                name="run_workflow_succeeded",
                condition=Q(status="succeeded"),
            ),
            # The watchdog: the workflow of each live run, from the index alone (a join
            # from running nodes read all 100 000 runs, every tick).
            models.Index(
                fields=["id", "workflow"],
                name="run_active",
                condition=Q(status__in=["pending", "running"]),
            ),
        ]

    def __str__(self):
        return f"run {self.pk} of {self.workflow.slug}"

    def get_absolute_url(self):
        return reverse("dashboard:run-detail", args=[self.pk])

    @property
    def is_finished(self):
        return self.status in self.TERMINAL


class NodeRunStatus(models.TextChoices):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class NodeRun(models.Model):
    """One node of one run: its current state. Attempts hold the history."""

    Status = NodeRunStatus

    TERMINAL = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED, Status.SKIPPED}
    )
    # States in which the engine still owes the node something.
    ACTIVE = frozenset({Status.QUEUED, Status.RUNNING, Status.RETRY_WAIT})
    # States that hold a pool slot.
    HOLDS_SLOT = frozenset({Status.QUEUED, Status.RUNNING})
    # Upstream states that let a downstream node go ahead.
    DONE = frozenset({Status.SUCCEEDED, Status.SKIPPED})

    # No index of its own: noderun_key_unique and noderun_run_status start with run, and
    # every index costs a write whenever a node changes state.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="nodes", db_index=False)
    node_key = models.CharField(max_length=100)
    node_type = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempt = models.PositiveIntegerField(default=0, help_text="Number of the current attempt.")
    max_attempts = models.PositiveIntegerField(default=1)
    attempts_base = models.PositiveIntegerField(
        default=0,
        help_text="Attempts made before the last operator reset; retries count from here.",
    )
    queue = models.CharField(max_length=32)
    pool = models.CharField(max_length=100, blank=True)
    timeout_seconds = models.PositiveIntegerField()
    soft_timeout_seconds = models.PositiveIntegerField(null=True, blank=True)
    expected_seconds = models.PositiveIntegerField(null=True, blank=True)
    stall_after_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="How long the node may go without progress (its definition's stall_after).",
    )
    pool_timeout_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="How long the node may wait for a slot of its pool (its pool_timeout).",
    )
    # Copied from the pinned version when the run starts, so a worker never has to read
    # the whole definition to run or advance one node (that would cost O(N) per node).
    params = models.JSONField(default=dict, blank=True)
    upstream = models.JSONField(default=list, blank=True)
    downstream = models.JSONField(default=list, blank=True)
    retry_policy = models.JSONField(default=dict, blank=True)
    pending_upstreams = models.PositiveIntegerField(
        default=0, help_text="Upstream nodes not yet succeeded or skipped (fan-in counter)."
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    progress = models.JSONField(null=True, blank=True)
    progress_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the current attempt's reported progress last moved (done or total).",
    )
    output = models.JSONField(null=True, blank=True)
    reason = models.TextField(blank=True, help_text="Why the node waits or failed.")
    retry_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "node_key"], name="noderun_key_unique"),
            models.CheckConstraint(
                condition=Q(status__in=NodeRunStatus.values), name="noderun_status_valid"
            ),
        ]
        indexes = [
            # engine.close_run_if_done: "is anything in this run still active?"
            models.Index(fields=["run", "status"], name="noderun_run_status"),
            # Watchdog: running nodes whose heartbeat went stale.
            models.Index(
                fields=["heartbeat_at"],
                name="noderun_running_heartbeat",
                condition=Q(status="running"),
            ),
            # engine.fail_pool_timeouts: the few nodes that may wait for a pool only so
            # long (their definition's pool_timeout), by when they began to wait.
            models.Index(
                fields=["updated_at"],
                name="noderun_pool_wait",
                condition=Q(status="pending", pool_timeout_seconds__isnull=False),
            ),
            # engine.promote_due_retries: retries whose backoff has passed.
            models.Index(
                fields=["retry_at"],
                name="noderun_retry_due",
                condition=Q(status="retry_wait"),
            ),
            # Watchdog: queued nodes whose RQ job may be lost; backlog age.
            models.Index(
                fields=["queued_at"],
                name="noderun_queued_since",
                condition=Q(status="queued"),
            ),
            # engine.fill_pool: slots in use, and ready nodes waiting for a slot.
            models.Index(
                fields=["pool", "status", "id"],
                name="noderun_pool_status",
                condition=~Q(pool=""),
            ),
        ]

    def __str__(self):
        return f"{self.node_key} (run {self.run_id})"

    @property
    def idempotency_key(self):
        """Stable across attempts of this node-run, so retried writes can be de-duplicated."""
        return f"keel-run{self.run_id}-{self.node_key}"


class AttemptStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    # Ended by the watchdog or an operator, not by the worker that ran it.
    ABANDONED = "abandoned"


class NodeAttempt(models.Model):
    Status = AttemptStatus

    TERMINAL = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED, Status.ABANDONED}
    )
    ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})

    # Indexed by attempt_number_unique, which starts with it.
    node_run = models.ForeignKey(
        NodeRun, on_delete=models.CASCADE, related_name="attempts", db_index=False
    )
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    rq_job_id = models.CharField(max_length=100)
    queue = models.CharField(max_length=32)
    worker = models.CharField(max_length=200, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    host = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_type = models.CharField(max_length=200, blank=True)
    error_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    cpu_percent = models.FloatField(null=True, blank=True)
    rss_bytes = models.BigIntegerField(null=True, blank=True)
    io_wait_percent = models.FloatField(null=True, blank=True)
    resource_samples = models.JSONField(
        default=list, blank=True, help_text="Recent heartbeat samples (bounded)."
    )

    class Meta:
        ordering = ["node_run", "number"]
        constraints = [
            models.UniqueConstraint(fields=["node_run", "number"], name="attempt_number_unique"),
            models.CheckConstraint(
                condition=Q(status__in=AttemptStatus.values), name="attempt_status_valid"
            ),
        ]
        indexes = [
            # /metrics (diagnostics.metrics): attempts that finished in the last hour.
            models.Index(fields=["finished_at"], name="attempt_finished"),
            # Watchdog: running attempts whose latest resource sample is over a limit.
            models.Index(
                fields=["node_run"], name="attempt_running", condition=Q(status="running")
            ),
            # Watchdog: nodes that timed out twice (few rows, looked at every tick).
            models.Index(
                fields=["node_run"], name="attempt_timed_out", condition=Q(status="timed_out")
            ),
            # Run search by error text (workflows.selectors.search_runs): only the attempts
            # that ended with an error are read, not every attempt (measured: 60 ms -> 2 ms
            # at 1 000 000 attempts on PostgreSQL).
            models.Index(fields=["node_run"], name="attempt_error", condition=~Q(error_type="")),
        ]

    def __str__(self):
        return f"attempt {self.number} of {self.node_run}"

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None


class CheckpointKind(models.TextChoices):
    PROGRESS = "progress"  # saved by a node while it works: where to resume
    NODE_DONE = "node_done"  # written by the engine when a node succeeds


class Checkpoint(models.Model):
    Kind = CheckpointKind

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="checkpoints")
    # Indexed by checkpoint_sequence_unique, which starts with it.
    node_run = models.ForeignKey(
        NodeRun,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="checkpoints",
        db_index=False,
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    sequence = models.PositiveIntegerField(help_text="Increases with every checkpoint of the node.")
    attempt = models.PositiveIntegerField(help_text="The attempt that saved it.")
    state = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "node_run", "sequence"]
        constraints = [
            models.UniqueConstraint(
                fields=["node_run", "sequence"], name="checkpoint_sequence_unique"
            ),
            models.CheckConstraint(
                condition=Q(kind__in=CheckpointKind.values), name="checkpoint_kind_valid"
            ),
        ]

    def __str__(self):
        return f"{self.kind} checkpoint {self.sequence} of {self.node_run or self.run}"


class LogLine(models.Model):
    attempt = models.ForeignKey(NodeAttempt, on_delete=models.CASCADE, related_name="log_lines")
    seq = models.PositiveIntegerField()
    at = models.DateTimeField()
    level = models.CharField(max_length=10)
    message = models.TextField()

    class Meta:
        ordering = ["attempt", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["attempt", "seq"], name="logline_seq_unique"),
        ]
        indexes = [
            # Log search across runs (workflows.log_search): a time window, newest first,
            # paged by (at, id). Without it every search read the whole table (85 ms -> 5 ms
            # for 24 hours of 1 000 000 lines on PostgreSQL).
            models.Index(fields=["at", "id"], name="logline_at"),
        ]

    def __str__(self):
        return f"{self.level} {self.message[:60]}"


class RunEventKind(models.TextChoices):
    TRANSITION = "transition"
    RETRY = "retry"
    OPERATOR = "operator"
    STALE = "stale"  # a message or result for an attempt that is no longer current
    FINDING = "finding"


class RunEvent(models.Model):
    """Append-only history of a run: transitions, operator actions, rejected results."""

    Kind = RunEventKind

    # Indexed by runevent_run_id, which starts with it.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events", db_index=False)
    node_run = models.ForeignKey(
        NodeRun, on_delete=models.CASCADE, null=True, blank=True, related_name="events"
    )
    at = models.DateTimeField(auto_now_add=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    actor = models.CharField(max_length=150)
    reason = models.TextField(blank=True)
    request_key = models.CharField(
        max_length=100,
        null=True,
        blank=True,
        unique=True,
        help_text="Idempotency key of the operator request that wrote it: a repeat changes nothing.",
    )
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["run", "at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=RunEventKind.values), name="runevent_kind_valid"
            ),
        ]
        indexes = [
            # A run's events: GET /api/v1/runs/{id}/events pages them by id (by (run, at),
            # PostgreSQL walked the whole table's ids to reach a big run's events); the run
            # page's history sorts one run's events.
            models.Index(fields=["run", "id"], name="runevent_run_id"),
        ]

    def __str__(self):
        return f"{self.kind} on run {self.run_id} by {self.actor}"


class ResourcePool(models.Model):
    """Bounded slots for a shared resource (a database, an API quota)."""

    name = models.SlugField(max_length=100, unique=True)
    slots = models.PositiveIntegerField(default=1)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.slots} slots)"


class ApiToken(models.Model):
    """A bearer token for scripts using the JSON API (workflows/api/auth.py).

    Only a SHA-256 of the token is stored: the token itself is shown once, when it is
    created (manage.py create_api_token), and cannot be read back. ``prefix`` keeps its
    first characters so a person can tell tokens apart in lists and logs.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'nightly cron'.")
    prefix = models.CharField(max_length=16, help_text="The token's first characters.")
    token_hash = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the token.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="After this moment the token is refused (none: never)."
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…) of {self.user}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class AuditAction(models.TextChoices):
    START_RUN = "start_run"
    CLEAR_QUEUE = "clear_queue"
    REQUEUE_FAILED = "requeue_failed"
    DEPLOY = "deploy"
    PROMOTE_DEPLOYMENT = "promote_deployment"
    ABORT_DEPLOYMENT = "abort_deployment"
    ROLLBACK_VERSION = "rollback_version"
    MOVE_RUNS_OFF = "move_runs_off"


class AuditEvent(models.Model):
    """One operator action that belongs to no run (a run's own actions are RunEvents), or
    one refused: a queue action (diagnostics/operations.py), a run start that was not
    allowed (workflows/operations.py).

    Written in the same call that acts, with what was seen just before and just after, so
    the trail says what the action actually changed; a refusal says so in ``before``.
    """

    Action = AuditAction

    actor = models.CharField(max_length=150, help_text="Username of who acted.")
    action = models.CharField(max_length=32, choices=AuditAction.choices)
    target = models.CharField(max_length=200, help_text="What was acted on, e.g. queue:default.")
    reason = models.TextField()
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True)
    request_key = models.CharField(
        max_length=200,
        null=True,
        blank=True,
        unique=True,
        help_text="Idempotency key of the request that acted: the same request again finds "
        "this row and changes nothing.",
    )

    class Meta:
        ordering = ["-at", "-id"]
        db_table = "diagnostics_auditevent"  # where it was made, before it moved here
        constraints = [
            models.CheckConstraint(
                condition=Q(action__in=AuditAction.values), name="auditevent_action_valid"
            ),
        ]
        indexes = [
            # The history of one target (a queue, a workflow), newest first.
            models.Index(fields=["target", "-at"], name="auditevent_target_at"),
        ]

    def __str__(self):
        return f"{self.action} on {self.target} by {self.actor}"
