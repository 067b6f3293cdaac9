"""Findings and the queue-action audit trail in the admin: read-only.

Findings are written by the watchdog and audit events by diagnostics/operations.py; an
edit here would falsify the history that detection and recovery times are computed from.
"""

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from diagnostics.models import AuditEvent, Finding


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class OpenFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "Open"), ("resolved", "Resolved")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.filter(resolved_at__isnull=True)
        if self.value() == "resolved":
            return queryset.filter(resolved_at__isnull=False)
        return queryset


@admin.register(Finding)
class FindingAdmin(ReadOnlyAdmin):
    list_display = [
        "code",
        "severity",
        "title",
        "subject",
        "run_link",
        "is_open",
        "first_seen",
        "last_seen",
        "resolved_at",
        "repaired_at",
    ]
    list_filter = [OpenFilter, "code", "severity", "queue"]
    list_select_related = ["run__workflow", "node_run"]
    search_fields = ["code", "subject", "title", "suggestion", "queue", "worker"]
    date_hierarchy = "first_seen"
    readonly_fields = [
        "code",
        "severity",
        "subject",
        "title",
        "run",
        "node_run",
        "queue",
        "worker",
        "evidence",
        "suggestion",
        "action",
        "first_seen",
        "last_seen",
        "resolved_at",
        "repaired_at",
        "repair",
    ]
    raw_id_fields = ["run", "node_run"]

    @admin.display(description="run", ordering="run")
    def run_link(self, finding):
        if finding.run is None:
            return "—"
        node = f" · {finding.node_run.node_key}" if finding.node_run else ""
        return format_html(
            '<a href="{}">run {} of {}</a>{}',
            finding.run.get_absolute_url(),
            finding.run_id,
            finding.run.workflow.slug,
            node,
        )

    @admin.display(description="open", boolean=True)
    def is_open(self, finding):
        return finding.is_open


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "actor", "action", "target", "reason", "before", "after"]
    list_filter = ["action", "target"]
    search_fields = ["actor", "target", "reason"]
    date_hierarchy = "at"
    readonly_fields = ["at", "actor", "action", "target", "reason", "before", "after"]

    def view_on_site(self, obj):
        return reverse("dashboard:system-report")
