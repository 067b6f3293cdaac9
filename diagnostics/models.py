"""Findings: what the watchdog diagnosed, with evidence and what to do (DESIGN §6)."""

from datetime import datetime

from django.db import models
from django.db.models import Q

from workflows.models import NodeRun, Run


def began_from(evidence) -> datetime | None:
    """The evidence's "since" (ISO 8601 with an offset) as a moment, or None: kept in a
    column so that time to detect is arithmetic on columns, not a cast of every finding's
    evidence (a mass incident's 10 000 findings cost /metrics half a second)."""
    since = (evidence or {}).get("since") if isinstance(evidence, dict) else None
    if not isinstance(since, str):
        return None
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


class FindingSeverity(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Finding(models.Model):
    """One diagnosis about one subject; open until the condition no longer holds.

    ``first_seen`` is when the watchdog first saw the condition (time to detect is
    first_seen minus when the condition began); ``resolved_at`` when it stopped holding
    (time to recover). At most one open finding exists per (code, subject).
    """

    Severity = FindingSeverity

    code = models.CharField(max_length=50, help_text="The cause, e.g. heartbeat_stale, job_lost.")
    severity = models.CharField(
        max_length=10, choices=FindingSeverity.choices, default=FindingSeverity.WARNING
    )
    subject = models.CharField(
        max_length=200,
        help_text="What the finding is about, e.g. node_run:42:1, queue:default, worker:w1, redis.",
    )
    run = models.ForeignKey(
        Run, on_delete=models.CASCADE, null=True, blank=True, related_name="findings"
    )
    node_run = models.ForeignKey(
        NodeRun, on_delete=models.CASCADE, null=True, blank=True, related_name="findings"
    )
    queue = models.CharField(max_length=100, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    title = models.CharField(max_length=300, help_text="What is wrong, in plain words.")
    evidence = models.JSONField(default=dict, blank=True)
    suggestion = models.TextField(help_text="What to do about it.")
    action = models.JSONField(
        default=dict,
        blank=True,
        help_text="The one-click action that fits, e.g. {'kind': 'retry_node', ...}.",
    )
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    repaired_at = models.DateTimeField(null=True, blank=True)
    repair = models.TextField(blank=True, help_text="What the watchdog did about it automatically.")
    digest = models.CharField(
        max_length=32,
        blank=True,
        help_text="A hash of what the finding says: a tick rewrites it only when that changes.",
    )
    began_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the condition began (the evidence's 'since'): time to detect is "
        "first_seen - began_at.",
    )

    class Meta:
        ordering = ["-last_seen", "-id"]
        # Held by AuditEvent until that moved to workflows (it audits run starts too).
        permissions = [("operate_queues", "Can clear queues and requeue failed jobs")]
        constraints = [
            models.UniqueConstraint(
                fields=["code", "subject"],
                condition=Q(resolved_at__isnull=True),
                name="finding_open_unique",
            ),
            models.CheckConstraint(
                condition=Q(severity__in=FindingSeverity.values), name="finding_severity_valid"
            ),
        ]
        indexes = [
            # Open findings: the "Stuck & findings" page, the upsert of each watchdog tick.
            models.Index(
                fields=["code", "subject"],
                name="finding_open",
                condition=Q(resolved_at__isnull=True),
            ),
            # Findings of one run (run and node pages, diagnose RUN_ID).
            models.Index(fields=["run", "-last_seen"], name="finding_run_seen"),
            # When the last outage of a store ended (detectors' Context.outage_ends), read
            # every tick; and the outage a watchdog merges a new sighting into.
            models.Index(fields=["code", "subject", "-resolved_at"], name="finding_code_resolved"),
            # /metrics (diagnostics.metrics): findings first seen, and findings resolved, in the
            # last hour.
            models.Index(fields=["first_seen"], name="finding_first_seen"),
            models.Index(
                fields=["resolved_at"],
                name="finding_resolved",
                condition=Q(resolved_at__isnull=False),
            ),
        ]

    def __str__(self):
        return f"{self.code} on {self.subject}"

    def save(self, *args, **kwargs):
        self.began_at = began_from(self.evidence)
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "evidence" in update_fields:
            kwargs["update_fields"] = {*update_fields, "began_at"}
        super().save(*args, **kwargs)

    @property
    def key(self) -> tuple[str, str]:
        return (self.code, self.subject)

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None
