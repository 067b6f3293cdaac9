"""Fault injection: kill, flush, restart, hang; measure how Keel notices and recovers.

    .venv/bin/python -m bench.faults [--repetitions 50] [--faults all|kill,flush,...]
                                     [--heartbeat 5]

Faults (bench/fault_scenarios.py, one method each):

- ``kill``: SIGKILL the worker running a node (12 checkpointed steps of 0.5 s) and its
  work horse once it has done a step or two; start a replacement.
- ``flush``: FLUSHALL while some nodes of a fan-out run run and others wait.
- ``redis_restart``: the same moment, but redis-server is killed, kept down 2 s and
  started again, empty, on the same port; both workers must live on.
- ``db_restart`` (PostgreSQL): ``pg_ctl restart -m fast`` while nodes run. It needs a
  cluster of the bench's own (initdb + pg_ctl from /usr/lib/postgresql/*/bin); when it
  is among the faults, the whole bench runs on that cluster. Skipped, saying why, when
  the binaries are missing.
- ``hang``: a node blocks SIGTERM/SIGINT/SIGALRM and sleeps; timeout 8 s, kill grace
  5 s. Attempt 1 must end timed_out ("killed ... ignored the stop request"); attempt 2
  completes.
- ``frozen_retry``: the same node with a 120 s timeout; once it runs, the operator
  retries it (workflows.operations.retry_node, as the dashboard's Retry button). Its
  worker must stop the old horse (SIGTERM, SIGKILL after the grace) and be free.

Everything runs on throwaway stores: a redis-server of its own on a free port, and a
fresh database — ``keel_faults_<pid>`` on the PostgreSQL server DATABASE_URL names (or
on the bench's own cluster, see db_restart), or a temporary SQLite file. Two real
forking workers (``manage.py rqworker``) and one real watchdog (``manage.py watchdog``)
run as subprocesses, heartbeat ``--heartbeat`` seconds (5 by default, as in production),
watchdog every 2 s.

Counted per fault: detect and recover (seconds from the fault; the table's legend says
what each measures), missed (no detection or no recovery seen), lost (a run not
succeeded within 120 s), doubled (a node whose body completed twice — bench/fault_nodes.py
records each completion — or whose output was applied twice), wrong (findings on the
run naming a cause that did not happen, e.g. worker_lost while its worker was alive),
failed (other checks: a worker died, an attempt ended the wrong way). Exit status 0 when
every repetition ran, whatever the numbers.
"""

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.fault_scenarios import (
    DESCRIPTIONS,
    FAULTS,
    KILL_GRACE_SECONDS,
    LABELS,
    RUN_TIMEOUT,
    TARGETS,
    Outcome,
    Scenarios,
    quietly,
)
from bench.fault_stores import (
    ThrowawayPostgres,
    ThrowawayRedis,
    free_port,
    kill_hard,
    postgres_bin_dir,
)

__all__ = ["Bench", "Outcome", "ThrowawayPostgres", "ThrowawayRedis", "free_port", "kill_hard"]

BASE_DIR = Path(__file__).resolve().parent.parent
QUEUES = ("high", "default", "low")
WORKER_CLASS = "workflows.runtime.worker.KeelWorker"
WATCHDOG_SECONDS = 2


@dataclass
class Bench(Scenarios):
    tmp: Path
    env: dict
    heartbeat: int
    redis: ThrowawayRedis
    postgres: ThrowawayPostgres | None = None
    db_down: float = 0.0  # seconds db_restart keeps PostgreSQL down; 0: pg_ctl restart
    workers: dict = field(default_factory=dict)  # name -> Popen
    watchdog: subprocess.Popen | None = None
    started: int = 0

    # Processes -------------------------------------------------------------------------

    def start_worker(self, wait: bool = True) -> str:
        self.started += 1
        name = f"faults-{os.getpid()}-{self.started}"
        log = self.worker_log_path(name).open("w")
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

    def ensure_workers(self, count: int) -> None:
        while sum(p.poll() is None for p in self.workers.values()) < count:
            self.start_worker()

    def kill_worker(self, name: str) -> None:
        """kill -9 a worker and its horse, on purpose: it no longer counts as ours."""
        process = self.workers.pop(name)
        kill_hard(process.pid)
        process.wait(timeout=10)

    def check_workers(self) -> list[str]:
        """Workers that died by themselves, with the end of their log; forgotten, so that
        ``ensure_workers`` replaces them."""
        died = []
        for name, process in list(self.workers.items()):
            if process.poll() is not None:
                tail = " | ".join(self.worker_log(name).strip().splitlines()[-3:])
                died.append(f"worker {name} died (exit status {process.returncode}): {tail}")
                del self.workers[name]
        return died

    def worker_log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def worker_log(self, name: str) -> str:
        path = self.worker_log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def registered_names(self) -> set[str]:
        from workflows.runtime import dispatch

        connection = dispatch.redis_connection()
        return {name for name in self.workers if connection.exists(f"rq:worker:{name}")}

    def registered(self, names) -> bool:
        return set(names) <= self.registered_names()

    def wait_registered(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not quietly(lambda: self.registered([name])):
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
        from workflows import engine
        from workflows.definitions import versioning

        version = versioning.load_definition(json.dumps(definition), actor="bench").version
        return engine.start_run(version, trigger="bench.faults")

    def wait_finished(self, run) -> bool:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if quietly(lambda: run.refresh_from_db() or run.is_finished):
                return run.status == run.Status.SUCCEEDED
            time.sleep(0.2)
        return False

    def cancel_unfinished(self) -> None:
        """End what a failed repetition left running, so that it holds no worker."""
        from workflows import engine
        from workflows.models import Run

        for pk in Run.objects.exclude(status__in=Run.TERMINAL).values_list("pk", flat=True):
            engine.cancel_run(pk, actor="bench.faults", reason="a repetition went wrong")

    def operator(self):
        """The user who clicks Retry: a superuser, as on a fresh install."""
        from django.contrib.auth import get_user_model

        user, _ = get_user_model().objects.get_or_create(
            username="bench-operator", defaults={"is_superuser": True, "is_staff": True}
        )
        return user

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


# --- Stores and the table ---------------------------------------------------------------------


def prepare(
    stack: contextlib.ExitStack, tmp: Path, heartbeat: int, postgres_bin: Path | None = None
) -> tuple[dict, ThrowawayRedis, ThrowawayPostgres | None]:
    """Throwaway Redis and database (on a cluster of our own given ``postgres_bin``), the
    environment for every process, Django set up."""
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
        KEEL_WATCHDOG_SECONDS=str(WATCHDOG_SECONDS),
        KEEL_KILL_GRACE_SECONDS=str(KILL_GRACE_SECONDS),
        KEEL_FAULTS_RECORD_DIR=str(tmp / "records"),
        PYTHONUNBUFFERED="1",
    )
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    postgres = None
    url = os.environ.get("DATABASE_URL", "")
    if postgres_bin is not None:
        postgres = ThrowawayPostgres(postgres_bin)
        stack.callback(postgres.stop)
        url = postgres.url
    if urlsplit(url).scheme in ("postgres", "postgresql"):
        name = f"keel_faults_{os.getpid()}"
        _postgres(url, f"CREATE DATABASE {name}")
        stack.callback(_postgres, url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", True)
        os.environ["DATABASE_URL"] = urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
        label = f"PostgreSQL (throwaway database {name})"
        if postgres is not None:
            label += f" on a cluster of its own, port {postgres.port}, {postgres.bin_dir}"
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
    return dict(os.environ), redis_server, postgres


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


COLUMNS = (
    f"{'fault':<24}{'reps':>5}{'detect p50':>12}{'detect max':>12}{'recover p50':>13}"
    f"{'recover max':>13}{'missed':>8}{'lost':>6}{'doubled':>9}{'wrong':>7}{'failed':>8}"
)


def table(results: dict[str, list[Outcome]], heartbeat: int, db_down: float = 0.0) -> str:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-", "-"
        return f"{statistics.median(values):.1f}s", f"{max(values):.1f}s"

    lines = [
        f"Fault recovery (heartbeat {heartbeat}s, watchdog every {WATCHDOG_SECONDS}s, kill grace "
        f"{KILL_GRACE_SECONDS}s"
        + (f"; db_restart keeps PostgreSQL down {db_down:g}s" if db_down else "")
        + ")",
        "",
        COLUMNS,
    ]
    verdicts, notes = [], []
    for fault, outcomes in results.items():
        detect = stats(o.detect for o in outcomes)
        recover = stats(o.recover for o in outcomes)
        missed = sum(o.detect is None or o.recover is None for o in outcomes)
        counts = [
            missed,
            sum(o.lost for o in outcomes),
            sum(o.doubled for o in outcomes),
            sum(o.wrong for o in outcomes),
            sum(bool(o.failures) for o in outcomes),
        ]
        lines.append(
            f"{LABELS[fault]:<24}{len(outcomes):>5}{detect[0]:>12}{detect[1]:>12}"
            f"{recover[0]:>13}{recover[1]:>13}{counts[0]:>8}{counts[1]:>6}{counts[2]:>9}"
            f"{counts[3]:>7}{counts[4]:>8}"
        )
        verdicts.append(f"  {LABELS[fault]}: {_verdict(fault, outcomes, counts)}")
        notes += _notes(fault, outcomes)
    detect_target, recover_target = TARGETS["kill"]
    lines += [
        "",
        f"Targets: detected <= {detect_target:.0f}s, running again <= {recover_target:.0f}s, "
        f"worker free <= {TARGETS['frozen_retry'][0]:.0f}s after the retry, 0 lost, 0 doubled "
        "(and 0 missed, 0 wrong, 0 failed).",
        *verdicts,
        "",
        "What detect / recover measure:",
        *(f"  {LABELS[fault]}: {DESCRIPTIONS[fault]}" for fault in results),
        "missed = no finding or no recovery seen within 60 s; lost = run not succeeded within "
        f"{RUN_TIMEOUT:.0f}s; doubled = nodes completed or applied twice; wrong = findings on "
        "the run naming a cause that did not happen; failed = repetitions where another check "
        "failed (a worker died, an attempt ended the wrong way).",
    ]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _verdict(fault: str, outcomes: list[Outcome], counts: list[int]) -> str:
    detect_target, recover_target = TARGETS[fault]
    misses = []
    worst_detect = max((o.detect for o in outcomes if o.detect is not None), default=None)
    worst_recover = max((o.recover for o in outcomes if o.recover is not None), default=None)
    if worst_detect is not None and worst_detect > detect_target:
        misses.append(f"detect max {worst_detect:.1f}s > {detect_target:.0f}s")
    if worst_recover is not None and worst_recover > recover_target:
        misses.append(f"recover max {worst_recover:.1f}s > {recover_target:.0f}s")
    for name, count in zip(("missed", "lost", "doubled", "wrong", "failed"), counts, strict=True):
        if count:
            misses.append(f"{count} {name}")
    return "targets met" if not misses else "NOT met: " + "; ".join(misses)


def _notes(fault: str, outcomes: list[Outcome]) -> list[str]:
    label = LABELS[fault]
    findings = sum((o.findings for o in outcomes), Counter())
    lines = [f"  {label}: findings on the runs: {_counted(findings) or 'none'}"]
    notes = Counter(o.note for o in outcomes if o.note)
    if notes:
        lines.append(f"  {label}: {_counted(notes)}")
    for number, outcome in enumerate(outcomes, 1):
        lines += [f"  {label}: repetition {number} failed: {why}" for why in outcome.failures]
    return lines


def _counted(counter: Counter) -> str:
    return "; ".join(f"{key} x{n}" for key, n in counter.most_common())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=50)
    parser.add_argument(
        "--faults", default="all", help=f"all, or a comma-separated subset of {','.join(FAULTS)}"
    )
    parser.add_argument("--heartbeat", type=int, default=5, help="KEEL_HEARTBEAT_SECONDS")
    parser.add_argument(
        "--db-down",
        type=float,
        default=0.0,
        help="db_restart: stop PostgreSQL, keep it down this many seconds, start it "
        "(default 0: pg_ctl restart -m fast)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args(argv)
    faults = (
        list(FAULTS) if options.faults == "all" else [f for f in options.faults.split(",") if f]
    )
    if unknown := set(faults) - set(FAULTS):
        parser.error(f"unknown fault(s) {', '.join(sorted(unknown))}: choose from {FAULTS}")
    postgres_bin = None
    if "db_restart" in faults:
        postgres_bin, why = postgres_bin_dir()
        if postgres_bin is None:
            print(f"skipping db_restart: {why}", flush=True)
            faults.remove("db_restart")
    # Stopped (SIGTERM, or SIGINT where a shell left it ignored), it still stops its
    # processes and removes its stores.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _stop)
    os.chdir(BASE_DIR)
    sys.path.insert(0, str(BASE_DIR))
    tmp = Path(tempfile.mkdtemp(prefix="keel-faults-"))
    results: dict[str, list[Outcome]] = {}
    with contextlib.ExitStack() as stack:
        if not options.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        env, redis_server, postgres = prepare(stack, tmp, options.heartbeat, postgres_bin)
        bench = Bench(
            tmp=tmp,
            env=env,
            heartbeat=options.heartbeat,
            redis=redis_server,
            postgres=postgres,
            db_down=options.db_down,
        )
        stack.callback(bench.stop_all)
        bench.start_watchdog()
        bench.ensure_workers(2)
        for fault in faults:
            results[fault] = []
            for number in range(1, options.repetitions + 1):
                started = time.monotonic()
                outcome = _repeat(bench, fault)
                results[fault].append(outcome)
                print(
                    f"{fault} {number}/{options.repetitions}: detect {_fmt(outcome.detect)}, "
                    f"recover {_fmt(outcome.recover)}, lost {outcome.lost}, doubled "
                    f"{outcome.doubled}, wrong {outcome.wrong}; findings "
                    f"{_counted(outcome.findings) or 'none'}"
                    + (f"; {outcome.note}" if outcome.note else "")
                    + f" ({time.monotonic() - started:.0f}s)",
                    flush=True,
                )
                for why in outcome.failures:
                    print(f"  FAILED: {why}", flush=True)
        print()
        print(table(results, options.heartbeat, options.db_down))
        if options.keep:
            print(f"\nlogs and records kept in {tmp}")
    return 0


def _repeat(bench: Bench, fault: str) -> Outcome:
    """One repetition; one that breaks down counts as failed and leaves nothing running."""
    # Repetitions of the same length would meet the watchdog's 2 s cycle at the same
    # moment each time: start each at a random point of it.
    time.sleep(random.uniform(0, WATCHDOG_SECONDS))
    try:
        return getattr(bench, f"{fault}_once")()
    except Exception as error:  # reported in the table; the bench goes on
        quietly(bench.cancel_unfinished)
        return Outcome(failures=[f"{type(error).__name__}: {error}", *bench.check_workers()])


def _stop(signum, frame):
    raise SystemExit(f"stopped by {signal.Signals(signum).name}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}s"


if __name__ == "__main__":
    sys.exit(main())
