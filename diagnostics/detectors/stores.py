"""Detectors about the two stores: Redis and the database."""

import contextlib

from django.db import DatabaseError

from diagnostics.detectors.context import CRITICAL, WARNING, Context, setting
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection
from workflows.runtime import dispatch


@detector("redis_unhealthy")
def redis_unhealthy(ctx: Context) -> list[Detection]:
    """Redis does not answer, its memory is near maxmemory, or it may evict keys."""
    url = dispatch.redacted_redis_url()
    if not ctx.redis_ok:
        ctx.keep_open |= {
            ("redis_unhealthy", "redis:memory"),
            ("redis_unhealthy", "redis:eviction_policy"),
        }
        return [
            Detection(
                code="redis_unhealthy",
                subject="redis:unreachable",
                severity=CRITICAL,
                title=f"Redis at {url} does not answer",
                suggestion=(
                    "Start or fix Redis (is the server up? `redis-cli -u REDIS_URL ping`; is "
                    "REDIS_URL right?). Nothing is lost meanwhile: nodes stay queued in the "
                    "database and the watchdog sends them once Redis answers."
                ),
                evidence={"url": url, "error": ctx.redis_error},
            )
        ]
    info = ctx.redis.info("memory")
    used, maxmemory = info.get("used_memory", 0), info.get("maxmemory", 0)
    policy = info.get("maxmemory_policy", "")
    evidence = {
        "url": url,
        "used_memory": used,
        "used_memory_human": info.get("used_memory_human"),
        "maxmemory": maxmemory,
        "maxmemory_policy": policy,
    }
    found = []
    ratio = setting("KEEL_REDIS_MEMORY_RATIO", 0.9)
    if maxmemory and used >= ratio * maxmemory:
        found.append(
            Detection(
                code="redis_unhealthy",
                subject="redis:memory",
                severity=CRITICAL,
                title=(
                    f"Redis uses {used / maxmemory:.0%} of its maxmemory "
                    f"({used / 2**20:.1f} of {maxmemory / 2**20:.1f} MiB)"
                ),
                suggestion=(
                    "Raise maxmemory, or clear old RQ registries (finished and failed jobs): "
                    "at the limit Redis refuses new jobs."
                ),
                evidence=evidence,
            )
        )
    if policy and policy != "noeviction":
        found.append(
            Detection(
                code="redis_unhealthy",
                subject="redis:eviction_policy",
                severity=WARNING,
                title=f"Redis may evict keys (maxmemory-policy {policy}), silently dropping jobs",
                suggestion=(
                    "Set `maxmemory-policy noeviction` (redis.conf, or CONFIG SET): Redis then "
                    "refuses writes when full instead of dropping queued jobs."
                ),
                evidence=evidence,
            )
        )
    return found


@detector("db_unhealthy")
def db_unhealthy(ctx: Context) -> list[Detection]:
    return database_problems(ctx.db)


def database_problems(db) -> list[Detection]:
    """The database does not answer, or (PostgreSQL) its connections are near the maximum."""
    try:
        db.ensure_connection()
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
            if db.vendor != "postgresql":
                return []
            cursor.execute(
                "SELECT count(*), current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int FROM pg_stat_activity"
            )
            used, maximum, reserved = cursor.fetchone()
    except DatabaseError as error:
        with contextlib.suppress(DatabaseError):
            db.close()
        return [
            Detection(
                code="db_unhealthy",
                subject="database:unreachable",
                severity=CRITICAL,
                title=f"The database ({db.vendor}) does not answer",
                suggestion=(
                    "Start or fix the database and check DATABASE_URL. Workers cannot claim or "
                    "finish nodes meanwhile; they resume once it answers."
                ),
                evidence={"vendor": db.vendor, "error": f"{type(error).__name__}: {error}"[:500]},
            )
        ]
    ratio = setting("KEEL_DB_CONNECTIONS_RATIO", 0.9)
    usable = max(1, maximum - reserved)
    if used < ratio * usable:
        return []
    return [
        Detection(
            code="db_unhealthy",
            subject="database:connections",
            severity=CRITICAL,
            title=f"The database has {used} connections open, near its limit of {usable}",
            suggestion=(
                "Lower the number of workers or gunicorn threads, close idle connections "
                "(KEEL_DB_CONN_MAX_AGE), put PgBouncer in front, or raise max_connections."
            ),
            evidence={
                "connections": used,
                "max_connections": maximum,
                "superuser_reserved_connections": reserved,
                "warn_ratio": ratio,
            },
        )
    ]
