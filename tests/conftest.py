"""Shared fixtures: real database, real Redis, real RQ workers in subprocesses."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import yaml
from django.conf import settings
from django.db import connection

from workflows import engine
from workflows.definitions import versioning
from workflows.runtime import dispatch

BASE_DIR = Path(__file__).resolve().parent.parent
WORKER_CLASSES = {
    "forking": "workflows.runtime.worker.KeelWorker",
    "simple": "workflows.runtime.worker.KeelSimpleWorker",
}


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def database_url_for_subprocess() -> str:
    """The URL of the database the tests use right now (the test database)."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    user = quote(params.get("USER") or "")
    password = quote(params.get("PASSWORD") or "")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return f"postgres://{auth}{params.get('HOST') or 'localhost'}:{params.get('PORT') or 5432}/{params['NAME']}"


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url_for_subprocess(),
        REDIS_URL=settings.REDIS_URL,
        PYTHONUNBUFFERED="1",
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class WorkerProcess:
    def __init__(self, process: subprocess.Popen, name: str, log_path: Path):
        self.process = process
        self.name = name
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def horse_pids(self) -> list[int]:
        """The worker's work horses (a forking worker has one while it runs a node)."""
        return [pid for pid, _ in self._children()]

    def _children(self) -> list[tuple[int, str | None]]:
        """(pid, name) of the worker's descendants; a horse may end while being listed."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                found.append((child.pid, child.name()))
            except psutil.NoSuchProcess:
                found.append((child.pid, None))
        return found

    def kill_hard(self) -> None:
        """SIGKILL the worker and its work horse: no RQ callback, no cleanup."""
        horses = [pid for pid, _ in self._children()]
        self.process.kill()
        _kill_all(horses)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        horses = [pid for pid, _ in self._children()]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        _kill_all(horses)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def _remove_keel_keys(redis) -> None:
    for pattern in ("rq:*", "keel:*"):
        keys = list(redis.scan_iter(pattern, count=1000))
        for start in range(0, len(keys), 500):
            redis.delete(*keys[start : start + 500])


@pytest.fixture
def clean_redis():
    """Remove Keel's and RQ's keys from the test Redis (never FLUSHALL a shared server),
    before the test and after it: a worker a test registered must not show up in the
    next test, which may not ask for a clean Redis."""
    redis = dispatch.redis_connection()
    _remove_keel_keys(redis)
    yield redis
    with contextlib.suppress(Exception):  # a test may have stopped this Redis on purpose
        _remove_keel_keys(redis)


@pytest.fixture
def start_worker(transactional_db, clean_redis, tmp_path):
    """Start real RQ workers (``manage.py rqworker``) as subprocesses; stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(
        kind: str = "forking", queues=("high", "default", "low"), name: str | None = None, **env
    ):
        from rq import Worker

        name = name or f"test-{kind}-{len(started)}-{os.getpid()}-{time.monotonic_ns()}"
        log_path = tmp_path / f"{name}.log"
        process = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "rqworker",
                *queues,
                "--name",
                name,
                "--worker-class",
                WORKER_CLASSES[kind],
            ],
            cwd=BASE_DIR,
            env=subprocess_env(**env),
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        worker = WorkerProcess(process, name, log_path)
        started.append(worker)

        def registered():
            if process.poll() is not None:
                pytest.fail(f"worker exited early:\n{worker.log()}")
            return any(w.name == name for w in Worker.all(connection=clean_redis))

        wait_for(registered, timeout=30, message=f"worker {name} to register")
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def start_watchdog(transactional_db, clean_redis, tmp_path):
    """Start ``manage.py watchdog`` as a subprocess (due retries, lost messages, findings)."""
    started: list[subprocess.Popen] = []

    def start(interval: float = 0.5, **env):
        log = (tmp_path / f"watchdog-{len(started)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "manage.py", "watchdog", "--interval", str(interval)],
            cwd=BASE_DIR,
            env=subprocess_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


class WithoutAliases(yaml.SafeDumper):
    """YAML as a person writes it: a dict used twice (a shared params block) is written
    twice, not as an anchor and alias, which definitions refuse."""

    def ignore_aliases(self, data):
        return True


@pytest.fixture
def make_version(db):
    """Load a definition given as a dict (or YAML text) and return its version."""

    def make(definition, actor: str = "test"):
        source = (
            definition
            if isinstance(definition, str)
            else yaml.dump(definition, Dumper=WithoutAliases, sort_keys=False)
        )
        return versioning.load_definition(source, actor=actor).version

    return make


@pytest.fixture
def start_run(make_version):
    def start(definition, params=None, trigger: str = "test"):
        version = definition if hasattr(definition, "spec") else make_version(definition)
        return engine.start_run(version, params=params or {}, trigger=trigger)

    return start


def finished(run, timeout: float = 60.0):
    """Wait for a run to reach a terminal status and return it refreshed."""

    def done():
        run.refresh_from_db()
        return run.status in run.TERMINAL

    wait_for(done, timeout=timeout, message=f"run {run.pk} to finish")
    return run


def pytest_sessionfinish(session, exitstatus):
    """Every process a test starts, it stops: fail the run on any child still alive.

    The embedded redis-server of this process is the one exception; it is stopped at exit.
    """
    keep = {int(os.environ.get("KEEL_TEST_REDIS_PID") or 0)}
    leftovers = [
        child
        for child in psutil.Process().children(recursive=True)
        if child.pid not in keep and child.status() != psutil.STATUS_ZOMBIE
    ]
    if not leftovers:
        return
    lines = []
    for child in leftovers:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {child.pid}: {' '.join(child.cmdline())[:200]}")
            child.kill()
    session.config.get_terminal_writer().line(
        "Tests left these processes running (now killed):\n" + "\n".join(lines), red=True
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
