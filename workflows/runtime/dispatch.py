"""Sending "run attempt N of node-run X" to RQ — and only after the database commits.

A message carries two ids and nothing else; the executor re-reads its rows. Job ids
are derived from (node-run, attempt), so the watchdog can ask RQ whether the job of
a queued node still exists, and a re-send replaces rather than duplicates it.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings
from django.db import transaction
from rq import Queue
from rq.serializers import JSONSerializer

logger = logging.getLogger(__name__)

EXECUTOR_FUNC = "workflows.runtime.executor.run_attempt"
# Kept a while as evidence for diagnostics; the database holds the real outcome.
RESULT_TTL = 600
FAILURE_TTL = 24 * 3600


@dataclass(frozen=True)
class Dispatch:
    node_run_id: int
    attempt: int
    queue: str
    timeout: int
    description: str = ""

    @classmethod
    def for_node(cls, node, note: str = "") -> "Dispatch":
        """The message for a node-run's current attempt."""
        return cls(
            node_run_id=node.pk,
            attempt=node.attempt,
            queue=node.queue,
            timeout=node.timeout_seconds,
            description=f"run {node.run_id} node {node.node_key} attempt {node.attempt}{note}",
        )


def job_id(node_run_id: int, attempt: int) -> str:
    return f"keel-{node_run_id}-{attempt}"


@cache
def redis_connection() -> redis.Redis:
    # redis-py notices a fork and opens fresh sockets in the child.
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=10, socket_connect_timeout=5)


def get_queue(name: str) -> Queue:
    return Queue(name, connection=redis_connection(), serializer=JSONSerializer)


def send_after_commit(dispatches: list[Dispatch]) -> None:
    """Enqueue once the current transaction commits, so a worker never sees a missing row."""
    if dispatches:
        transaction.on_commit(lambda: send(dispatches))


def send(dispatches: list[Dispatch]) -> bool:
    """Put the messages on their queues. Returns False when Redis could not be reached.

    All of them in one pipeline (one round trip, MULTI/EXEC), whatever their queues.
    A failure here loses nothing: the nodes stay ``queued`` in the database and the
    watchdog re-sends every queued node whose job RQ does not have.
    """
    by_queue: dict[str, list[Dispatch]] = defaultdict(list)
    for dispatch in dispatches:
        by_queue[dispatch.queue].append(dispatch)
    try:
        with redis_connection().pipeline() as pipe:
            for queue_name, items in by_queue.items():
                get_queue(queue_name).enqueue_many(
                    [
                        Queue.prepare_data(
                            EXECUTOR_FUNC,
                            args=(item.node_run_id, item.attempt),
                            timeout=item.timeout,
                            job_id=job_id(item.node_run_id, item.attempt),
                            result_ttl=RESULT_TTL,
                            failure_ttl=FAILURE_TTL,
                            description=item.description
                            or f"node-run {item.node_run_id} attempt {item.attempt}",
                        )
                        for item in items
                    ],
                    pipeline=pipe,
                )
            pipe.execute()
    except redis.RedisError as error:
        logger.warning(
            "Could not reach Redis at %s to enqueue %d node(s): %s. They stay queued in the "
            "database; the watchdog (manage.py watchdog) enqueues them once Redis answers.",
            redacted_redis_url(),
            len(dispatches),
            error,
        )
        return False
    return True


def redacted_redis_url() -> str:
    url = settings.REDIS_URL
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def missing_jobs(job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` that RQ has no job for (empty when Redis is down)."""
    from rq.job import Job

    if not job_ids:
        return set()
    connection = redis_connection()
    try:
        with connection.pipeline(transaction=False) as pipe:
            for one in job_ids:
                pipe.exists(Job.key_for(one))
            present = pipe.execute()
    except redis.RedisError as error:
        logger.warning("Could not reach Redis to look for lost jobs: %s", error)
        return set()
    return {one for one, exists in zip(job_ids, present, strict=True) if not exists}


def stop_jobs(job_ids: list[str]) -> None:
    """Take queued jobs off their queues and stop running ones; best effort.

    The database already says the attempts are cancelled, so a job that still runs
    finds out at its next heartbeat and anything it reports is rejected.
    """
    from rq.command import send_stop_job_command
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job, JobStatus

    connection = redis_connection()
    for one in job_ids:
        try:
            job = Job.fetch(one, connection=connection, serializer=JSONSerializer)
            status = job.get_status(refresh=False)
            if status == JobStatus.STARTED:
                send_stop_job_command(connection, one, serializer=JSONSerializer)
            elif status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            continue
        except redis.RedisError as error:
            logger.warning("Could not reach Redis to stop job %s: %s", one, error)
            return
