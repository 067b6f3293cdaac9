"""RQ worker classes for Keel: JSON-only messages and clean database connections.

``manage.py rqworker high default low`` uses KeelWorker (settings.RQ["WORKER_CLASS"]).
"""

from django.db import connections, transaction
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, Worker

# Imported by the parent, so that no forked work horse pays for importing the executor.
from workflows import executor  # noqa: F401
from workflows.models import NodeAttempt, NodeRun, Run


def warm_up_orm() -> None:
    """Run the kinds of statements a node attempt runs, matching no rows, then close.

    Django compiles and caches much per query shape and per model on first use; done once in
    the forking worker's parent, every work horse inherits it instead of paying for it
    again (measured with bench/engine.py: several ms per node).
    """
    with transaction.atomic():
        NodeRun.objects.filter(pk=-1, status="queued", attempt=0).update(status="running")
        NodeAttempt.objects.filter(node_run_id=-1, number=0).values_list("pk", flat=True).first()
        list(Run.objects.select_for_update(no_key=True).filter(pk=-1))
        list(NodeRun.objects.select_for_update(no_key=True).filter(pk=-1))
        NodeRun.objects.filter(run_id=-1, status__in=NodeRun.ACTIVE).exists()
        list(NodeRun.objects.select_related("run").filter(pk=-1))
    connections.close_all()


class KeelWorker(Worker):
    """The forking worker: each job runs in a fresh work horse, killable on timeout."""

    def __init__(self, *args, **kwargs):
        # Whatever --serializer says: Keel's messages are JSON, never pickle.
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)
        warm_up_orm()

    def fork_work_horse(self, job, queue):
        # A forked child must not share the parent's database socket.
        connections.close_all()
        super().fork_work_horse(job, queue)

    def perform_job(self, job, queue):
        try:
            return super().perform_job(job, queue)
        finally:
            if self._is_horse:
                # The horse leaves through os._exit(); say goodbye to the database first.
                connections.close_all()


class KeelSimpleWorker(SimpleWorker):
    """The non-forking worker: faster per job; a hard timeout still interrupts the job."""

    def __init__(self, *args, **kwargs):
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)
