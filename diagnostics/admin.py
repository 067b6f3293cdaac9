"""Findings and the queue-action audit trail in the admin: read-only.

Findings are written by the watchdog and audit events by diagnostics/operations.py; an
edit here would falsify the history that detection and recovery times are computed from.
"""

from django.conf import settings
from django.contrib import admin
from django.utils.html import format_html

from diagnostics.models import Finding
from workflows.admin_lists import HistoryAdmin, LargeListMixin, choices_filter


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


def _codes():
    from diagnostics.detectors import registry

    return sorted({d.code for d in registry.DETECTORS})


def _queues():
    return settings.KEEL_QUEUES


@admin.register(Finding)
class FindingAdmin(LargeListMixin, HistoryAdmin):
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
    list_filter = [
        OpenFilter,
        choices_filter("code", "code", _codes),
        "severity",
        choices_filter("queue", "queue", _queues),
    ]
    ordering = ["-id"]  # newest first, by the primary key (last_seen has no index of its own)
    list_select_related = ["run__workflow", "node_run"]
    search_fields = ["code", "subject", "title", "suggestion", "queue", "worker"]
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
