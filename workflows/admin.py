from django.conf import settings
from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from workflows import admin_actions
from workflows.admin_lists import HistoryAdmin, LargeListMixin, choices_filter
from workflows.api import auth as api_auth
from workflows.models import (
    ApiToken,
    AuditEvent,
    Checkpoint,
    Deployment,
    LogLine,
    NodeAttempt,
    NodeRun,
    ResourcePool,
    Run,
    RunEvent,
    Workflow,
    WorkflowVersion,
)


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class VersionInline(ReadOnlyInline):
    model = WorkflowVersion
    fields = ["number", "created_at", "created_by", "checksum", "note"]
    readonly_fields = fields
    ordering = ["-number"]


@admin.register(Workflow)
class WorkflowAdmin(admin_actions.OperateRunsMixin, admin.ModelAdmin):
    actions = [admin_actions.rollback_to_version]
    list_display = ["slug", "name", "created_at", "updated_at"]
    search_fields = ["slug", "name", "description"]
    readonly_fields = ["created_at", "updated_at"]
    inlines = [VersionInline]


@admin.register(WorkflowVersion)
class WorkflowVersionAdmin(admin_actions.OperateRunsMixin, admin.ModelAdmin):
    actions = [admin_actions.move_runs_off]
    list_display = ["workflow", "number", "created_by", "created_at", "short_checksum"]
    list_filter = ["workflow"]
    list_select_related = ["workflow"]
    search_fields = ["workflow__slug", "note", "created_by"]
    readonly_fields = [
        "workflow",
        "number",
        "spec",
        "source",
        "checksum",
        "created_by",
        "created_at",
    ]

    @admin.display(description="checksum")
    def short_checksum(self, obj):
        return obj.checksum[:12]

    def has_add_permission(self, request):
        return False  # versions come from load_workflow, so each has a validated spec


@admin.register(Deployment)
class DeploymentAdmin(admin_actions.OperateRunsMixin, HistoryAdmin):
    """Deployments are made, promoted, aborted and rolled back only by the audited
    services (workflows/deployments/services.py): here, the actions."""

    actions = [admin_actions.promote_deployments, admin_actions.abort_deployments]
    list_display = [
        "id",
        "workflow",
        "version_number",
        "strategy",
        "state",
        "share",
        "actor",
        "created_at",
    ]
    list_filter = ["state", "strategy"]
    list_select_related = ["workflow", "version"]  # and get_queryset leaves the spec out
    search_fields = ["workflow__slug", "actor", "reason", "outcome"]
    fields = [
        "workflow",
        "version",
        "baseline",
        "strategy",
        "state",
        "share",
        "steps",
        "step",
        "step_started_at",
        "min_runs",
        "key_param",
        "validation_run",
        "retire_baseline_at",
        "actor",
        "reason",
        "outcome",
        "analysis",
        "evidence",
        "created_at",
        "updated_at",
        "finished_at",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("workflow", "version", "baseline")
            .defer("version__spec", "version__source", "baseline__spec", "baseline__source")
        )

    @admin.display(description="version", ordering="version__number")
    def version_number(self, obj):
        return f"v{obj.version.number}"

    @admin.display(description="share of new runs")
    def share(self, obj):
        return f"{obj.percent}%"

    @admin.display(description="last analysis")
    def analysis(self, obj):
        return admin_actions.evidence_html(obj.evidence)


class NodeRunInline(ReadOnlyInline):
    model = NodeRun
    fields = [
        "node_key",
        "node_type",
        "status",
        "attempt",
        "max_attempts",
        "queue",
        "pool",
        "heartbeat_at",
        "reason",
    ]
    readonly_fields = fields


class RunEventInline(ReadOnlyInline):
    model = RunEvent
    fields = ["at", "kind", "node_run", "actor", "reason"]
    readonly_fields = fields
    show_change_link = False


def _queues():
    return settings.KEEL_QUEUES


def _pools():
    return ResourcePool.objects.order_by("name").values_list("name", flat=True)


QueueFilter = choices_filter("queue", "queue", _queues)
PoolFilter = choices_filter("pool", "pool", _pools)


@admin.register(Run)
class RunAdmin(LargeListMixin, admin_actions.OperateRunsMixin, HistoryAdmin):
    actions = [admin_actions.resume_runs, admin_actions.cancel_runs]
    list_display = [
        "id",
        "workflow",
        "version_number",
        "status",
        "trigger",
        "started_at",
        "finished_at",
        "dashboard_link",
    ]
    list_filter = ["status", "workflow", "created_at"]
    list_select_related = ["workflow", "version"]  # and get_queryset leaves the spec out
    search_fields = ["=id", "workflow__slug", "trigger", "reason"]
    readonly_fields = [
        "workflow",
        "version",
        "status",
        "params",
        "trigger",
        "priority",
        "reason",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "deadline",
        "pools",
        "dashboard_link",
    ]
    inlines = [NodeRunInline, RunEventInline]

    def get_queryset(self, request):
        return super().get_queryset(request).with_version()

    @admin.display(description="version", ordering="version__number")
    def version_number(self, obj):
        return f"v{obj.version.number}"

    @admin.display(description="dashboard")
    def dashboard_link(self, obj):
        return format_html('<a href="{}">open</a>', reverse("dashboard:run-detail", args=[obj.pk]))


class AttemptInline(ReadOnlyInline):
    model = NodeAttempt
    fields = [
        "number",
        "status",
        "worker",
        "host",
        "pid",
        "started_at",
        "finished_at",
        "error_type",
        "error_message",
    ]
    readonly_fields = fields


class CheckpointInline(ReadOnlyInline):
    model = Checkpoint
    fields = ["sequence", "kind", "attempt", "created_at", "state"]
    readonly_fields = fields


class NodeEventInline(RunEventInline):
    fk_name = "node_run"


@admin.register(NodeRun)
class NodeRunAdmin(LargeListMixin, admin_actions.OperateRunsMixin, HistoryAdmin):
    actions = [
        admin_actions.retry_nodes,
        admin_actions.retry_nodes_with_downstream,
        admin_actions.skip_nodes,
        admin_actions.rollback_to_node,
        admin_actions.stop_nodes,
    ]
    list_display = [
        "id",
        "run",
        "node_key",
        "node_type",
        "status",
        "attempt",
        "queue",
        "pool",
        "heartbeat_at",
    ]
    list_filter = ["status", QueueFilter, PoolFilter, "run__workflow"]
    list_select_related = ["run", "run__workflow"]
    ordering = ["-id"]  # newest first, by the primary key (the model's order joins runs)
    search_fields = ["node_key", "node_type", "=run__id", "reason"]
    readonly_fields = [f.name for f in NodeRun._meta.fields]
    inlines = [AttemptInline, CheckpointInline, NodeEventInline]


class LogLineInline(ReadOnlyInline):
    model = LogLine
    fields = ["seq", "at", "level", "message"]
    readonly_fields = fields
    show_change_link = False


@admin.register(Checkpoint)
class CheckpointAdmin(admin_actions.OperateRunsMixin, HistoryAdmin):
    """Checkpoints, to roll a run back to one (the run page offers the same)."""

    actions = [admin_actions.rollback_to_checkpoint]
    list_display = ["id", "run", "node_run", "kind", "sequence", "attempt", "created_at"]
    list_filter = ["kind", "run__workflow"]
    list_select_related = ["run", "run__workflow", "node_run", "node_run__run"]
    search_fields = ["=run__id", "node_run__node_key"]
    ordering = ["-run_id", "node_run_id", "sequence"]
    readonly_fields = [f.name for f in Checkpoint._meta.fields]


@admin.register(NodeAttempt)
class NodeAttemptAdmin(LargeListMixin, HistoryAdmin):
    list_display = [
        "id",
        "node_run",
        "number",
        "status",
        "worker",
        "host",
        "started_at",
        "finished_at",
        "error_type",
    ]
    # error_type is searched, not filtered: its choices would be a DISTINCT over every attempt.
    list_filter = ["status", QueueFilter]
    list_select_related = ["node_run", "node_run__run", "node_run__run__workflow"]
    ordering = ["-id"]
    search_fields = [
        "=node_run__run__id",
        "node_run__node_key",
        "worker",
        "rq_job_id",
        "error_type",
        "error_message",
    ]
    readonly_fields = [f.name for f in NodeAttempt._meta.fields]
    inlines = [LogLineInline]


@admin.register(AuditEvent)
class AuditEventAdmin(HistoryAdmin):
    list_display = ["at", "actor", "action", "target", "reason", "before", "after"]
    list_filter = ["action", "target"]
    search_fields = ["actor", "target", "reason"]
    date_hierarchy = "at"
    readonly_fields = ["at", "actor", "action", "target", "reason", "before", "after"]


@admin.register(RunEvent)
class RunEventAdmin(LargeListMixin, HistoryAdmin):
    list_display = ["at", "run", "node_run", "kind", "actor", "reason"]
    list_filter = ["kind"]
    list_select_related = ["run", "run__workflow", "node_run", "node_run__run"]
    search_fields = ["=run__id", "actor", "reason"]
    readonly_fields = [f.name for f in RunEvent._meta.fields]


@admin.register(ResourcePool)
class ResourcePoolAdmin(admin.ModelAdmin):
    list_display = ["name", "slots", "description", "updated_at"]
    search_fields = ["name"]
    readonly_fields = ["created_at", "updated_at"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are created with manage.py create_api_token, which shows the token once;
    here they are listed and revoked, never read back (only a SHA-256 is stored)."""

    list_display = [
        "name",
        "user",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    ]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    list_select_related = ["user"]
    search_fields = ["name", "prefix", "user__username"]
    fields = ["user", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    readonly_fields = fields
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # the token must be shown once: use manage.py create_api_token

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        revoked = sum(api_auth.revoke_token(token) for token in queryset)
        self.message_user(
            request,
            f"{revoked} token(s) revoked; scripts that use them now get 401.",
            messages.SUCCESS,
        )
