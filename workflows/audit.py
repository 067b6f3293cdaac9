"""Audit rows for actions that belong to no run: what was done, or what was refused.

A refusal is audited too, so that an attempt without the permission leaves a trace. The
same user refused the same action on the same target within REFUSALS_COUNTED_FOR is
counted on the first row (``after["refused_again"]``), not written again, so a script
retrying in a loop cannot flood the audit.
"""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from workflows.models import AuditEvent

REFUSALS_COUNTED_FOR = timedelta(minutes=1)


def record_refusal(actor: str, action: str, target: str, reason: str, permission: str) -> None:
    now = timezone.now()
    actor = actor or "anonymous"
    with transaction.atomic():
        earlier = (
            AuditEvent.objects.select_for_update()
            .filter(actor=actor, action=action, target=target, at__gte=now - REFUSALS_COUNTED_FOR)
            .filter(before__denied=True)
            .order_by("-at")
            .first()
        )
        if earlier is not None:
            earlier.after = {"refused_again": (earlier.after or {}).get("refused_again", 0) + 1}
            earlier.save(update_fields=["after"])
            return
        AuditEvent.objects.create(
            actor=actor,
            action=action,
            target=target,
            reason=(reason or "").strip()[:2000] or "(no reason given)",
            before={"denied": True, "missing_permission": permission},
            after={},
        )
