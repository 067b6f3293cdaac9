"""RQ worker classes for Keel: JSON-only messages and clean database connections.

``manage.py rqworker high default low`` uses KeelWorker (settings.RQ["WORKER_CLASS"]).
"""

import os
import select
import time

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone
from rq import worker_registration
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, Worker

from workflows import executor, sql
from workflows.companion import Companion
from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run


def warm_up() -> None:
    """Do once what every node attempt does first, matching no rows, then disconnect.

    Much is set up on first use in a process: the connection's helper objects, the
    fields' value conversions, the ORM's query compilation (still used off the hot
    path: failures, stale messages). Done before the first fork, every work horse whose
    node uses the database inherits it instead of paying for it again (a few ms, measured
    in a forked horse).
    """
    now = timezone.now()
    with transaction.atomic():
        sql.fetch_all(f"SELECT id FROM {sql.table(Run)} WHERE id = %s{sql.row_lock()}", [-1])
        sql.to_db(NodeRun, "started_at", now)
        sql.to_db(NodeRun, "output", {})
        sql.from_db(NodeRun, "params", "{}")
        for model in (NodeAttempt, Checkpoint):
            sql._insert_shape(model)
        list(Run.objects.select_for_update(no_key=True).filter(pk=-1))
        list(NodeRun.objects.select_for_update(no_key=True).filter(pk=-1))
        NodeAttempt.objects.filter(node_run_id=-1, number=0).update(updated_at=now)
        NodeRun.objects.filter(pk=-1).values("run_id", "status", "attempt").first()
    connections.close_all()


class RegistersAgain:
    """Register the worker again when Redis has forgotten it (a FLUSHALL, a failover to
    an empty replica).

    RQ registers a worker once, at birth. Without this a live worker stays invisible
    after a flush until it restarts: ``no_worker`` findings and alerts for queues it
    serves, doctor's ✗, no worker in the system report. Checked at a heartbeat, at most
    every REGISTRATION_CHECK_SECONDS, so it costs nothing per job.
    """

    REGISTRATION_CHECK_SECONDS = 5.0
    _registration_checked_at = float("-inf")

    def heartbeat(self, timeout=None, pipeline=None):
        if (
            not getattr(self, "_is_horse", False)
            and time.monotonic() - self._registration_checked_at >= self.REGISTRATION_CHECK_SECONDS
        ):
            self._registration_checked_at = time.monotonic()
            if not self.connection.hexists(self.key, "birth"):
                self.log.warning(
                    "Worker %s: Redis no longer knows this worker (flushed?); registering again.",
                    self.name,
                )
                with self.connection.pipeline() as registration:
                    registration.hset(self.key, mapping=self.serialize())
                    worker_registration.register(self, registration)
                    registration.execute()
        super().heartbeat(timeout, pipeline)


class HasCompanion:
    """A Keel worker's database companion (workflows/companion.py) claims and reports the
    attempts of the jobs the worker runs, over one warm connection of its own: the claim
    while RQ does its bookkeeping for the job in Redis, the report while the worker goes
    on to its next job."""

    # Whether jobs run in a work horse, which returns the outcome as the job's result.
    forks = False

    def __init__(self, *args, **kwargs):
        # Whatever --serializer says: Keel's messages are JSON, never pickle.
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)
        self._companion = Companion()

    def execute_job(self, job, queue):
        key = executor.send_claim(
            job, worker=self.name, host=self.hostname, companion=self._companion
        )
        self._claim_key = key
        try:
            super().execute_job(job, queue)
        finally:
            self._claim_key = None
            if key is not None:
                executor.finish_job(
                    job,
                    key,
                    worker=self.name,
                    companion=self._companion,
                    forked=self.forks,
                )

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        found = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if found is None and timeout is None and self._companion.busy:
            # A burst worker stops at its first empty look at the queues: the companion's
            # last report may still queue the next nodes, so wait for it and look again.
            # (A worker that blocks on its queues gets those nodes when they come.)
            self._companion.settle()
            found = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        return found

    def teardown(self):
        super().teardown()
        if not self._is_horse:
            self._companion.close()


class KeelWorker(HasCompanion, RegistersAgain, Worker):
    """The forking worker: each job runs in a fresh work horse, killable on timeout.

    The horse runs the node and returns its outcome as the job's result; the worker holds
    no database connection when it forks (its companion has it), and a horse opens one
    only if its node asks for something (inputs, checkpoints, logs, a heartbeat). The
    claim is read just before the fork.
    """

    forks = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        warm_up()

    def fork_work_horse(self, job, queue):
        key = getattr(self, "_claim_key", None)
        if key is not None:
            executor.receive_claim(key)
        # No connection crosses a fork (a SQLite one must not); the companion has the
        # worker's, so this closes only what something else may have opened.
        connections.close_all()
        super().fork_work_horse(job, queue)  # the horse never returns from it: os._exit
        if key is not None:
            self._note_horse_pid_at = time.monotonic() + settings.KEEL_HEARTBEAT_SECONDS / 2

    def wait_for_horse(self):
        """Note the horse's pid on the attempt once it has run for half a heartbeat
        interval, before its first beat: diagnostics look at the process that runs the
        node. A node that ends sooner never costs the write."""
        note_at = getattr(self, "_note_horse_pid_at", None)  # None: noted, or nothing to note
        if note_at is not None:
            # RQ's own monitoring alarm may interrupt this wait; the next call waits for
            # what is left of it.
            if not _ends_within(self.horse_pid, max(0.0, note_at - time.monotonic())):
                executor.record_work_horse(self._claim_key, self.horse_pid, self._companion)
            self._note_horse_pid_at = None
        return super().wait_for_horse()

    def execute_job(self, job, queue):
        try:
            super().execute_job(job, queue)
        finally:
            self._note_horse_pid_at = None

    def main_work_horse(self, job, queue):
        self._companion.abandon_in_child()
        super().main_work_horse(job, queue)

    def perform_job(self, job, queue):
        try:
            return super().perform_job(job, queue)
        finally:
            if self._is_horse:
                # The horse leaves through os._exit(); say goodbye to the database first.
                connections.close_all()


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether child ``pid`` ends within ``seconds`` (it is not reaped: RQ waits for it)."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3 or newer: do not wait
        return False
    try:
        ended, _, _ = select.select([handle], [], [], seconds)
        return bool(ended)
    finally:
        os.close(handle)


class KeelSimpleWorker(HasCompanion, RegistersAgain, SimpleWorker):
    """The non-forking worker: faster per job; a hard timeout still interrupts the job.

    The node runs in the worker process, on that process's own connection if it asks for
    something (inputs, checkpoints, logs, a heartbeat); its outcome is left for the worker,
    whose companion reports it.
    """
