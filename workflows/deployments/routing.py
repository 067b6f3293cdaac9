"""Which version a new run gets: the workflow's deployments decide, runs stay pinned.

- An ``active`` deployment: every new run gets its version.
- A canary (``ramping``) beside it: the step's share of new runs gets the canary's
  version, the rest the baseline. Deterministic: the n-th run routed in a step goes to
  the canary when ``floor(n·p/100)`` grows at n, so any 100 consecutive runs hold exactly
  p canary runs. With ``key_param``, runs whose parameter has the same value always get
  the same version (a hash of the value picks a bucket from 0 to 99).
- A blue-green deployment ``validating``: every new run stays on the baseline until the
  validation run has passed.
"""

import hashlib

from django.db import connection

from workflows.models import Deployment, Workflow, WorkflowVersion


def version_for_new_run(
    workflow: Workflow, params: dict
) -> tuple[WorkflowVersion | None, Deployment | None]:
    """The version a new run with these params gets, and the deployment that chose it
    (None for a workflow never deployed: its latest version)."""
    live = {
        deployment.state: deployment
        for deployment in Deployment.objects.filter(
            workflow=workflow, state__in=Deployment.LIVE
        ).select_related("version", "baseline")
    }
    in_flight = live.get(Deployment.State.RAMPING) or live.get(Deployment.State.VALIDATING)
    if in_flight is not None:
        if in_flight.state == Deployment.State.RAMPING and _to_canary(in_flight, params):
            return in_flight.version, in_flight
        return in_flight.baseline, in_flight
    active = live.get(Deployment.State.ACTIVE)
    if active is not None:
        return active.version, active
    return workflow.versions.order_by("-number").first(), None


def _to_canary(deployment: Deployment, params: dict) -> bool:
    percent = deployment.percent
    if deployment.key_param and deployment.key_param in params:
        value = str(params[deployment.key_param]).encode()
        digest = hashlib.sha256(b"%d:%s" % (deployment.pk, value)).digest()
        return int.from_bytes(digest[:4], "big") % 100 < percent
    # One UPDATE … RETURNING: concurrent starts each get their own number.
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {connection.ops.quote_name(Deployment._meta.db_table)} "
            "SET routed = routed + 1 WHERE id = %s RETURNING routed",
            [deployment.pk],
        )
        (n,) = cursor.fetchone()
    return n * percent // 100 > (n - 1) * percent // 100
