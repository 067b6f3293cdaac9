"""Admin change lists that stay fast at a million rows.

Django's change list counts the whole table twice (the page count and "N total"), reads
each ``list_filter`` field's choices (and a ``date_hierarchy``'s dates) with a DISTINCT
over the table, and sorts by the model's ordering (a node run's is its run's, a join).
These give it an estimated count for an unfiltered big table and filters whose choices are
known without reading the table; the admins use orderings an index serves and no date
hierarchy (the dashboard's runs list filters by date).
"""

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property

# Below this many rows (by PostgreSQL's estimate) the change list counts exactly.
ESTIMATE_ABOVE = 10_000


class EstimatedCountPaginator(Paginator):
    """Counts an unfiltered list from PostgreSQL's statistics (``pg_class.reltuples``,
    kept by autovacuum) when the table is big; anything filtered is counted exactly."""

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        connection = connections[queryset.db]
        if connection.vendor == "postgresql" and not queryset.query.where:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [queryset.model._meta.db_table],
                )
                row = cursor.fetchone()
            if row and row[0] >= ESTIMATE_ABOVE:
                return row[0]
        return super().count


class LargeListMixin:
    """For change lists of tables that grow with every run."""

    show_full_result_count = False
    paginator = EstimatedCountPaginator
    # Half Django's 100: each row's action checkbox is a rendered widget, and 100 rows of
    # runs took the admin's list past 100 ms.
    list_per_page = 50


def choices_filter(field: str, title: str, choices) -> type[admin.SimpleListFilter]:
    """A list filter on ``field`` whose choices come from ``choices()`` (settings, a small
    table, the code), not from a DISTINCT over the listed table."""

    class ChoicesFilter(admin.SimpleListFilter):
        parameter_name = field

        def lookups(self, request, model_admin):
            return [(value, value) for value in choices()]

        def queryset(self, request, queryset):
            return queryset.filter(**{field: self.value()}) if self.value() else queryset

    ChoicesFilter.title = title
    return ChoicesFilter


class HistoryAdmin(admin.ModelAdmin):
    """Keel's history — runs, node runs, attempts, checkpoints, events, findings, the audit:
    shown, never added, changed or deleted here (deleting a node run rewrote its run's
    count, with no reason and no event). State changes go through the audited operations,
    offered as the list's actions."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
