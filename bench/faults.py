"""Fault injection: kill -9 a busy worker, FLUSHALL Redis mid-run; measure the recovery.

    .venv/bin/python -m bench.faults [--repetitions 50] [--faults kill,flush] [--heartbeat 5]

Everything runs on throwaway stores: a redis-server of its own on a free port (it gets
flushed), and a fresh database — ``keel_faults_<pid>`` on the PostgreSQL server
DATABASE_URL names, or a temporary SQLite file. Two real workers
(``manage.py rqworker``) and one real watchdog (``manage.py watchdog``) run as
subprocesses, with the heartbeat at ``--heartbeat`` seconds (5 by default, as in
production) and the watchdog every 2 s.

Each repetition of ``kill``: a run with one ``faults.work`` node (12 steps of 0.5 s,
each checkpointed); once it has done a step or two, SIGKILL the worker running it and
its work horse, and start a replacement worker. Detect = first finding on that node
after the kill; recover = the node running again (its next attempt claimed) on
another worker.

Each repetition of ``flush``: a run of six ``faults.work`` nodes (4 x 0.5 s) then a
seventh after them all, on two workers; while some run and some wait, FLUSHALL. Detect
= first ``job_lost`` finding of the run after the flush; recover = every node that was
queued or running at the flush has been claimed again or has finished.

Lost = a run that did not succeed within 120 s. Doubled = a node whose body ran to
completion twice (bench/fault_nodes.py records each completion in a file) or whose
output was applied twice (two succeeded attempts or two node_done checkpoints).
Exit status 0 when every repetition ran, whatever the numbers.
"""

import argparse
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BASE_DIR = Path(__file__).resolve().parent.parent
QUEUES = ("high", "default", "low")
WORKER_CLASS = "workflows.worker.KeelWorker"
RUN_TIMEOUT = 120.0
DETECT_TARGET, RECOVER_TARGET = 20.0, 30.0


# --- Helpers shared with tests/diagnostics ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ThrowawayRedis:
    """A redis-server of our own on a free TCP port: safe to FLUSHALL, kill or restart."""

    def __init__(self, directory: Path, *extra_args: str):
        from config import embedded_redis

        self.port = free_port()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                embedded_redis.redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(self.directory / f"redis-{self.port}.log"),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while not self.answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def answers(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def kill_hard(pid: int) -> None:
    """SIGKILL a process and all its children (a worker and its work horse)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for one in [pid, *(child.pid for child in children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(one, signal.SIGKILL)


# --- The bench --------------------------------------------------------------------------------


@dataclass
class Outcome:
    detect: float | None = None
    recover: float | None = None
    lost: bool = False
    doubled: int = 0


@dataclass
class Bench:
    tmp: Path
    env: dict
    heartbeat: int
    workers: dict = field(default_factory=dict)  # name -> Popen
    watchdog: subprocess.Popen | None = None
    started: int = 0

    # Processes -------------------------------------------------------------------------

    def start_worker(self, wait: bool = True) -> str:
        self.started += 1
        name = f"faults-{os.getpid()}-{self.started}"
        log = (self.tmp / f"{name}.log").open("w")
        self.workers[name] = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "rqworker",
                *QUEUES,
                "--name",
                name,
                "--worker-class",
                WORKER_CLASS,
            ],
            cwd=BASE_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_registered(name)
        return name

    def wait_registered(self, name: str, timeout: float = 30) -> None:
        from workflows import dispatch

        deadline = time.monotonic() + timeout
        while not dispatch.redis_connection().exists(f"rq:worker:{name}"):
            if time.monotonic() > deadline or self.workers[name].poll() is not None:
                raise RuntimeError(f"worker {name} did not start; see {self.tmp / name}.log")
            time.sleep(0.1)

    def start_watchdog(self) -> None:
        log = (self.tmp / "watchdog.log").open("w")
        self.watchdog = subprocess.Popen(
            [sys.executable, "manage.py", "watchdog"],
            cwd=BASE_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_all(self) -> None:
        for process in [*self.workers.values(), self.watchdog]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers.values(), self.watchdog]:
            if process is None:
                continue
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_hard(process.pid)

    # Runs ------------------------------------------------------------------------------

    def start_run(self, definition: dict):
        import yaml

        from workflows import engine, versioning

        version = versioning.load_definition(yaml.safe_dump(definition), actor="bench").version
        return engine.start_run(version, trigger="bench.faults")

    def wait_finished(self, run) -> bool:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            run.refresh_from_db()
            if run.is_finished:
                return run.status == run.Status.SUCCEEDED
            time.sleep(0.2)
        return False

    def doubled(self, run) -> int:
        from django.db.models import Count

        from bench.fault_nodes import completions
        from workflows.models import Checkpoint, NodeAttempt, NodeRun

        twice = set()
        for key in NodeRun.objects.filter(run=run).values_list("node_key", flat=True):
            if completions(self.tmp / "records", run.pk, key) > 1:
                twice.add(key)
        for model, status_field, value in (
            (NodeAttempt, "status", NodeAttempt.Status.SUCCEEDED),
            (Checkpoint, "kind", Checkpoint.Kind.NODE_DONE),
        ):
            rows = (
                model.objects.filter(node_run__run=run, **{status_field: value})
                .values("node_run__node_key")
                .annotate(n=Count("id"))
                .filter(n__gt=1)
            )
            twice |= {row["node_run__node_key"] for row in rows}
        return len(twice)

    # Faults ----------------------------------------------------------------------------

    def kill_once(self) -> Outcome:
        from django.utils import timezone

        from diagnostics.models import Finding
        from workflows.models import NodeAttempt, NodeRun

        while sum(p.poll() is None for p in self.workers.values()) < 2:
            self.start_worker()
        run = self.start_run(KILL_DEFINITION)
        node = NodeRun.objects.get(run=run, node_key="work")
        wanted_steps = random.randint(1, 3)
        until(lambda: _steps_done(node) >= wanted_steps, 60, "the node to make progress")
        victim = NodeAttempt.objects.get(node_run=node, number=1).worker
        killed_at = timezone.now()
        kill_hard(self.workers[victim].pid)
        self.workers[victim].wait(timeout=10)
        self.start_worker(wait=False)  # the next repetition needs two again
        outcome = Outcome()

        def detected():
            first = (
                Finding.objects.filter(node_run=node, first_seen__gte=killed_at)
                .order_by("first_seen")
                .first()
            )
            return first and (first.first_seen - killed_at).total_seconds()

        def recovered():
            again = (
                NodeAttempt.objects.filter(node_run=node, number__gt=1, started_at__isnull=False)
                .exclude(worker=victim)
                .order_by("number")
                .first()
            )
            return again and (again.started_at - killed_at).total_seconds()

        outcome.detect = until(detected, 60, "a finding", fail=False)
        outcome.recover = until(recovered, 60, "the node to run again", fail=False)
        outcome.lost = not self.wait_finished(run)
        outcome.doubled = self.doubled(run)
        return outcome

    def flush_once(self, redis_server: "ThrowawayRedis") -> Outcome:
        from django.utils import timezone

        from diagnostics.models import Finding
        from workflows.models import NodeAttempt, NodeRun

        run = self.start_run(FLUSH_DEFINITION)

        def mixed():
            statuses = list(NodeRun.objects.filter(run=run).values_list("status", flat=True))
            return "running" in statuses and "queued" in statuses

        until(mixed, 60, "nodes running and queued at once")
        redis_server.client().flushall()
        flushed_at = timezone.now()
        at_flush = dict(
            NodeRun.objects.filter(run=run, status__in=["queued", "running"]).values_list(
                "pk", "attempt"
            )
        )
        outcome = Outcome()

        def detected():
            first = (
                Finding.objects.filter(run=run, code="job_lost", first_seen__gte=flushed_at)
                .order_by("first_seen")
                .first()
            )
            return first and (first.first_seen - flushed_at).total_seconds()

        def recovered():
            moments = []
            for pk, attempt in at_flush.items():
                node = NodeRun.objects.only("status", "finished_at").get(pk=pk)
                later = (
                    NodeAttempt.objects.filter(
                        node_run_id=pk, number__gte=attempt, started_at__gt=flushed_at
                    )
                    .order_by("started_at")
                    .values_list("started_at", flat=True)
                    .first()
                )
                if later is None and node.status == "succeeded":
                    later = node.finished_at
                if later is None:
                    return None
                moments.append((later - flushed_at).total_seconds())
            return max(moments, default=0.0) or 0.001

        outcome.detect = until(detected, 60, "a job_lost finding", fail=False)
        outcome.recover = until(recovered, 90, "every node to run again", fail=False)
        outcome.lost = not self.wait_finished(run)
        outcome.doubled = self.doubled(run)
        return outcome


KILL_DEFINITION = {
    "name": "Faults kill",
    "nodes": {
        "work": {
            "type": "faults.work",
            "params": {"steps": 12, "step_seconds": 0.5},
            "timeout": 120,
            "retries": {"max_attempts": 3, "backoff": 0},
        }
    },
}
FLUSH_DEFINITION = {
    "name": "Faults flush",
    "nodes": {
        **{
            f"part{i}": {
                "type": "faults.work",
                "params": {"steps": 4, "step_seconds": 0.5},
                "timeout": 120,
                "retries": {"max_attempts": 3, "backoff": 0},
            }
            for i in range(6)
        },
        "total": {
            "type": "faults.work",
            "params": {"steps": 1, "step_seconds": 0.1},
            "after": [f"part{i}" for i in range(6)],
        },
    },
}


def _steps_done(node) -> int:
    """Checkpoints count steps at once (progress waits for the next heartbeat)."""
    from workflows.models import Checkpoint

    return Checkpoint.objects.filter(node_run=node, kind=Checkpoint.Kind.PROGRESS).count()


def until(predicate, timeout: float, what: str, fail: bool = True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    if fail:
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
    return None


# --- Stores and the table ---------------------------------------------------------------------


def prepare(stack: contextlib.ExitStack, tmp: Path, heartbeat: int) -> tuple[dict, ThrowawayRedis]:
    """Throwaway Redis and database, the environment for every process, Django set up."""
    redis_server = ThrowawayRedis(tmp / "redis")
    stack.callback(redis_server.stop)
    (tmp / "records").mkdir()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        KEEL_VAR_DIR=str(tmp),
        DEBUG="0",
        REDIS_URL=redis_server.url,
        KEEL_NODE_MODULES="workflows.nodes.builtin,bench.fault_nodes",
        KEEL_HEARTBEAT_SECONDS=str(heartbeat),
        KEEL_WATCHDOG_SECONDS="2",
        KEEL_FAULTS_RECORD_DIR=str(tmp / "records"),
        PYTHONUNBUFFERED="1",
    )
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    url = os.environ.get("DATABASE_URL", "")
    if urlsplit(url).scheme in ("postgres", "postgresql"):
        name = f"keel_faults_{os.getpid()}"
        _postgres(url, f"CREATE DATABASE {name}")
        stack.callback(_postgres, url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", True)
        os.environ["DATABASE_URL"] = urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
        label = f"PostgreSQL (throwaway database {name})"
    else:
        name = str(tmp / "faults.sqlite3")
        os.environ["DATABASE_URL"] = f"sqlite:///{name}"
        label = "SQLite (temporary file)"
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    if str(connection.settings_dict["NAME"]) != name:
        # Settings were read before DATABASE_URL pointed at the throwaway database.
        raise SystemExit(f"refusing to migrate {connection.settings_dict['NAME']}: not {name}")
    call_command("migrate", verbosity=0)
    print(f"database: {label}; Redis: throwaway redis-server on port {redis_server.port}")
    return dict(os.environ), redis_server


def _postgres(url: str, statement: str, close_django: bool = False) -> None:
    """Run a statement in the server's maintenance database (never Django's connection:
    touching it before DATABASE_URL is final would read the settings too early)."""
    import psycopg

    if close_django:
        from django.db import connections

        connections.close_all()
    admin_url = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(statement)


def table(results: dict[str, list[Outcome]], heartbeat: int) -> str:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-", "-"
        return f"{statistics.median(values):.1f}s", f"{max(values):.1f}s"

    lines = [
        f"Fault recovery (heartbeat {heartbeat}s, watchdog every 2s; targets for kill: "
        f"detect <= {DETECT_TARGET:.0f}s, recover <= {RECOVER_TARGET:.0f}s)",
        "",
        f"{'fault':<22}{'reps':>5}{'detect p50':>12}{'detect max':>12}"
        f"{'recover p50':>13}{'recover max':>13}{'missed':>8}{'lost':>6}{'doubled':>9}",
    ]
    labels = {"kill": "kill -9 worker+horse", "flush": "FLUSHALL mid-run"}
    for fault, outcomes in results.items():
        detect = stats(o.detect for o in outcomes)
        recover = stats(o.recover for o in outcomes)
        missed = sum(o.detect is None or o.recover is None for o in outcomes)
        lines.append(
            f"{labels[fault]:<22}{len(outcomes):>5}{detect[0]:>12}{detect[1]:>12}"
            f"{recover[0]:>13}{recover[1]:>13}{missed:>8}{sum(o.lost for o in outcomes):>6}"
            f"{sum(o.doubled for o in outcomes):>9}"
        )
    lines.append("")
    lines.append(
        "missed = repetitions with no finding or no recovery seen within 60-90 s; "
        "lost = runs not succeeded within 120 s; doubled = nodes completed or applied twice."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=50)
    parser.add_argument("--faults", default="kill,flush", help="kill, flush or both")
    parser.add_argument("--heartbeat", type=int, default=5, help="KEEL_HEARTBEAT_SECONDS")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args(argv)
    faults = [f for f in options.faults.split(",") if f]
    if set(faults) - {"kill", "flush"}:
        parser.error("--faults takes kill, flush or kill,flush")
    os.chdir(BASE_DIR)
    sys.path.insert(0, str(BASE_DIR))
    tmp = Path(tempfile.mkdtemp(prefix="keel-faults-"))
    results: dict[str, list[Outcome]] = {}
    with contextlib.ExitStack() as stack:
        if not options.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        env, redis_server = prepare(stack, tmp, options.heartbeat)
        bench = Bench(tmp=tmp, env=env, heartbeat=options.heartbeat)
        stack.callback(bench.stop_all)
        bench.start_watchdog()
        bench.start_worker()
        bench.start_worker()
        for fault in faults:
            results[fault] = []
            for number in range(1, options.repetitions + 1):
                started = time.monotonic()
                outcome = bench.kill_once() if fault == "kill" else bench.flush_once(redis_server)
                results[fault].append(outcome)
                print(
                    f"{fault} {number}/{options.repetitions}: detect {_fmt(outcome.detect)}, "
                    f"recover {_fmt(outcome.recover)}, lost {outcome.lost}, doubled "
                    f"{outcome.doubled} ({time.monotonic() - started:.0f}s)",
                    flush=True,
                )
        print()
        print(table(results, options.heartbeat))
        if options.keep:
            print(f"\nlogs and records kept in {tmp}")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}s"


if __name__ == "__main__":
    sys.exit(main())
