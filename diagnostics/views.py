"""Health endpoints for load balancers and orchestrators: no login, no pages."""

import logging

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from diagnostics import health

logger = logging.getLogger(__name__)


@never_cache
@require_GET
def healthz(request):
    """The process is up and serving. Touches neither the database nor Redis."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request):
    """Ready for traffic: the database and Redis both answer (503 naming which did not).

    The answer is public, so it names the failing part and the error's type only; the
    full error goes to the log.
    """
    checks = {"database": health.database_ping(), "redis": health.redis_ping()}
    failed = [name for name, check in checks.items() if not check["ok"]]
    for name in failed:
        logger.warning("readyz: %s is not ready: %s", name, checks[name]["error"])
        checks[name] = {"ok": False, "error": checks[name]["error"].split(":", 1)[0]}
    return JsonResponse(
        {"status": "unavailable" if failed else "ok", "failed": failed, "checks": checks},
        status=503 if failed else 200,
    )
