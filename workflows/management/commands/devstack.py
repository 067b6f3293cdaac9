"""``manage.py devstack``: the whole of Keel on a laptop, started and stopped as one (``make run``).

1. Start the embedded Redis when REDIS_URL is unset (else use REDIS_URL as it is).
2. Migrate, load each demo definition whose content is new to its workflow, create the
   superuser ``admin`` with the password kept in var/admin-password (made once).
3. Spawn an RQ worker, the watchdog and gunicorn, each in its own process group.
4. Wait until the web server answers; on the first start (or with --demo-runs) start one run
   of each demo workflow; print how to log in, and again once the children's start-up
   lines have passed.
5. Supervise. A child that exits, for whatever reason, is restarted on its own after a backoff
   (1 s, doubling up to 30 s; 1 s again once it has stayed up 60 s), with one line saying why;
   the others stay up. What the dead child left behind (a work horse, the companion, gunicorn's
   workers) is stopped first, as systemd does with a unit's processes. The record of it is
   ``var/supervisor.json``, which the system report shows. If the embedded Redis dies, devstack
   stops everything: what the queues held is gone, so start again.
6. Ctrl-C or SIGTERM stops everything it started, running or waiting to restart, and exits 0.
"""

import contextlib
import http.client
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from config import embedded_redis
from config.env import env_int
from workflows import operations
from workflows.definitions import versioning
from workflows.definitions.spec import DefinitionError
from workflows.models import Run

HOST = "127.0.0.1"
ADMIN_USERNAME = "admin"
DEMO_ACTOR = "devstack"
# Seconds after the welcome when where and how to log in is said once more.
REMIND_AFTER_SECONDS = 5
DEMO_DIR = Path(settings.BASE_DIR) / "workflows" / "demo_definitions"
WEB_READY_SECONDS = 60
STOP_GRACE_SECONDS = 10
FIRST_BACKOFF_SECONDS = 1
MAX_BACKOFF_SECONDS = 30
# A child that stayed up this long was healthy: its next restart waits the first backoff again.
STEADY_SECONDS = 60
# diagnostics.system_report reads this file; devstack must not import diagnostics.
SUPERVISOR_FILE = "supervisor.json"
# Every process devstack starts inherits this variable (the value names devstack and the
# spawn), so what a child leaves behind is found even after it was re-parented.
SPAWN_VARIABLE = "KEEL_DEVSTACK_SPAWN"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class StopRequested(Exception):
    """Raised from the signal handler, so a stop interrupts whatever step is running."""


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    spawn: str = ""  # this start's value of SPAWN_VARIABLE
    started_at: datetime | None = None
    up_since: float = 0.0  # time.monotonic() at the start
    restarts: int = 0
    backoff: float = 0.0  # the last delay before a restart
    restart_at: float | None = None  # time.monotonic() of the next start, while waiting
    last_exit: str = ""
    last_exit_at: datetime | None = None
    last_pid: int | None = None
    readers: list[threading.Thread] = field(default_factory=list, repr=False)

    @property
    def command(self) -> str:
        return " ".join(self.argv[1:]).removeprefix("-m ")

    @property
    def running(self) -> bool:
        """Started and not yet seen to exit (a waiting child has no process)."""
        return self.process is not None and self.restart_at is None

    @property
    def exited(self) -> bool:
        return self.running and self.process.poll() is not None

    def next_backoff(self) -> float:
        if not self.backoff or time.monotonic() - self.up_since >= STEADY_SECONDS:
            return FIRST_BACKOFF_SECONDS
        return min(self.backoff * 2, MAX_BACKOFF_SECONDS)

    def record(self) -> dict:
        """This child as the system report shows it (see SUPERVISOR_FILE)."""
        waiting = self.restart_at is not None
        return {
            "name": self.name,
            "command": self.command,
            "state": "restarting" if waiting else "running",
            "pid": None if waiting or self.process is None else self.process.pid,
            "started_at": None if waiting else _iso(self.started_at),
            "restarts": self.restarts,
            "restart_in_seconds": self.backoff if waiting else None,
            "last_exit": self.last_exit,
            "last_exit_at": _iso(self.last_exit_at),
            "last_exit_pid": self.last_pid,
        }

    def signal_group(self, signum: int) -> set[int]:
        """Signal the group and every descendant; return the pids signalled by name."""
        # The group, not just the leader: gunicorn's workers too. RQ puts each work horse in
        # a process group of its own (os.setpgrp), so descendants are signalled one by one.
        descendants = self._descendants()
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)
        return {self.process.pid, *descendants}

    def _descendants(self) -> list[int]:
        try:
            return [
                child.pid for child in psutil.Process(self.process.pid).children(recursive=True)
            ]
        except psutil.NoSuchProcess:
            return []

    def group_alive(self) -> bool:
        self.process.poll()  # reap the leader, so a zombie does not count as alive
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


class Command(BaseCommand):
    help = (
        "Run Keel on this machine: embedded Redis, migrations, demo workflows, an admin user, "
        "an RQ worker, the watchdog and the web server; restarts a worker, watchdog or web "
        "server that dies. Ctrl-C stops everything."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--port",
            type=int,
            default=None,
            help="Port of the web server on 127.0.0.1 (default KEEL_PORT, else 8000).",
        )
        demo_runs = parser.add_mutually_exclusive_group()
        demo_runs.add_argument(
            "--demo-runs",
            action="store_true",
            help="Start a run of each demo workflow (done by itself only on the first start).",
        )
        demo_runs.add_argument(
            "--no-demo-runs",
            action="store_true",
            help="Do not start demo runs, even on the first start.",
        )

    def handle(self, *args, **options):
        self.port = options["port"] or env_int("KEEL_PORT", 8000, minimum=1, maximum=65535)
        if not 1 <= self.port <= 65535:
            raise CommandError(f"--port {self.port} is not a TCP port; use 1-65535.")
        self.base_url = f"http://{HOST}:{self.port}/"
        self.children: list[Child] = []
        self.redis_process = None
        self.output_lock = threading.Lock()
        self.stopping = self.hurry = False
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.started_at = _now()
        self._check_port_free()
        self._install_signal_handlers()
        try:
            self._start_redis()
            self._prepare_database()
            slugs = self._load_demo_definitions()
            password = self._admin_password()
            # Only on the first start (no run of devstack's yet), unless asked.
            first = not Run.objects.filter(trigger=DEMO_ACTOR).exists()
            wanted = options["demo_runs"] or (first and not options["no_demo_runs"])
            self._spawn_children()
            self._wait_for_web()
            run_ids = self._start_demo_runs(slugs) if wanted else []
            self._print_welcome(password, run_ids)
            self._supervise(remind=password)
        except StopRequested as stop:
            self._say(f"\n{stop}: stopping everything (a second Ctrl-C kills at once)…")
        finally:
            self.stopping = True
            self._stop_everything()
        self._say(self.style.SUCCESS("Stopped."))

    def _say(self, text: str) -> None:
        # Relay threads write too: one line at a time, flushed, so a log file reads in order.
        with self.output_lock:
            self.stdout.write(text)
            self.stdout.flush()

    # --- Start-up ----------------------------------------------------------------------------

    def _check_port_free(self) -> None:
        # Gunicorn would retry for seconds and then die; say what to do instead.
        with socket.socket() as probe:
            # As gunicorn does, so connections of a previous run in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, self.port))
            except OSError:
                raise CommandError(
                    f"Port {self.port} on {HOST} is in use (another devstack?). Stop that, or "
                    "pick another port with --port N or KEEL_PORT=N."
                ) from None

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            if self.stopping:
                self.hurry = True  # a second Ctrl-C: kill instead of waiting
                return
            self.stopping = True
            raise StopRequested(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    def _start_redis(self) -> None:
        if not settings.KEEL_EMBEDDED_REDIS:
            self._say("Redis: REDIS_URL is set; using it.")
            return
        socket_path = Path(settings.KEEL_EMBEDDED_REDIS_SOCKET)
        try:
            self.redis_process = embedded_redis.start(socket_path)
        except RuntimeError as error:
            raise CommandError(str(error)) from None
        if self.redis_process is None:
            # Someone else's server (a previous devstack's?): use it, and leave it running.
            self._say(f"Redis: an embedded Redis already answers on {socket_path}; using it.")
        else:
            self._say(f"Redis: started the embedded Redis on {socket_path}.")

    def _prepare_database(self) -> None:
        call_command("migrate", interactive=False, verbosity=1)
        if not settings.DEBUG:
            # WhiteNoise serves only collected files when DEBUG is off.
            call_command("collectstatic", interactive=False, verbosity=0)

    def _load_demo_definitions(self) -> list[str]:
        """Each demo file, loaded only when its content is new to its workflow: an
        operator's later version stays the latest until the file itself changes."""
        paths = sorted(DEMO_DIR.glob("*.yaml"))
        if not paths:
            raise CommandError(f"No demo definitions found in {DEMO_DIR}.")
        slugs = []
        for path in paths:
            try:
                result = versioning.load_file(path, actor=DEMO_ACTOR, once=True)
            except DefinitionError as error:
                raise CommandError(f"{error}\nFix the demo definition and run again.") from None
            self._say(str(result))
            slugs.append(result.version.workflow.slug)
        return slugs

    def _admin_password(self) -> str | None:
        """The admin's password, kept in var/admin-password: made on the first start and
        the same on every start after. None when the admin has changed it since (then it
        is left alone)."""
        path = self._password_path()
        saved = path.read_text().strip() if path.exists() else ""
        user = get_user_model().objects.filter(username=ADMIN_USERNAME).first()
        if user is not None and saved and not user.check_password(saved):
            return None
        password = saved or secrets.token_urlsafe(16)
        if user is None:
            user = get_user_model()(username=ADMIN_USERNAME)
        user.is_active = user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        if not saved:
            self._write_private_file(path, password + "\n")
        return password

    def _password_path(self) -> Path:
        return Path(settings.VAR_DIR) / "admin-password"

    @staticmethod
    def _write_private_file(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            os.fchmod(file.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
            file.write(text)

    def _spawn_children(self) -> None:
        # Paths relative to BASE_DIR, the children's working directory.
        self.children = [
            Child("worker", [sys.executable, "manage.py", "rqworker", *settings.KEEL_QUEUES]),
            Child("watchdog", [sys.executable, "manage.py", "watchdog"]),
            Child("web", [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py"]),
        ]
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.spawn = f"{self.tag}/{child.name}/{child.restarts}"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "KEEL_BIND": f"{HOST}:{self.port}",
            SPAWN_VARIABLE: child.spawn,
        }
        child.process = subprocess.Popen(
            child.argv,
            cwd=settings.BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own session and process group: Ctrl-C in the terminal reaches only us, so
            # nothing half-stops on its own, and killpg reaches the child's own children.
            start_new_session=True,
        )
        child.started_at, child.up_since, child.restart_at = _now(), time.monotonic(), None
        reader = threading.Thread(
            target=self._relay_output, args=(child.name, child.process), daemon=True
        )
        reader.start()
        child.readers = [*filter(threading.Thread.is_alive, child.readers), reader]
        self._say(f"Started {child.name} (pid {child.process.pid}): {child.command}")
        self._write_supervision_record()

    def _relay_output(self, name: str, process: subprocess.Popen) -> None:
        """Copy a child's output to ours, each line prefixed with the child's name."""
        with process.stdout:
            for raw in process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                self._say(f"{name:>8} | {line}")

    def _wait_for_web(self) -> None:
        deadline = time.monotonic() + WEB_READY_SECONDS
        while not self._web_answers():
            self._supervise_once()
            if time.monotonic() > deadline:
                raise CommandError(
                    f"The web server did not answer on {self.base_url} within "
                    f"{WEB_READY_SECONDS}s; see the 'web |' lines above."
                )
            time.sleep(0.2)

    def _web_answers(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            connection.request("GET", "/")
            return connection.getresponse().status < 500
        except OSError:
            return False
        finally:
            connection.close()

    def _start_demo_runs(self, slugs: list[str]) -> list[int]:
        run_ids = []
        for slug in slugs:
            try:
                run = operations.start_run(slug, actor=DEMO_ACTOR)
            except operations.OperationError as error:
                self._say(self.style.ERROR(f"Could not start a demo run of {slug}: {error}"))
                continue
            self._say(f"Started run {run.pk} of {slug}: {self.base_url}runs/{run.pk}/")
            run_ids.append(run.pk)
        return run_ids

    def _print_welcome(self, password: str | None, run_ids: list[int]) -> None:
        manage = self._manage_command_for_humans()
        latest = Run.objects.order_by("-pk").values_list("pk", flat=True).first()
        run_id = run_ids[0] if run_ids else latest or "RUN_ID"
        lines = [
            "",
            self.style.SUCCESS("Keel is running."),
            f"  Dashboard   {self.base_url}",
            f"  Admin       {self.base_url}admin/",
            self._login_line(password),
            "",
            *(
                []
                if run_ids
                else [
                    "Demo runs start on the first start only; `make run ARGS=--demo-runs` "
                    "starts them again.",
                    "",
                ]
            ),
            "Try, in another terminal:",
            f"  {manage} run_workflow fan-out --wait 120",
            f"  {manage} show_run {run_id}",
            f'  {manage} cancel_run {run_id} --reason "just trying"',
            f"  {manage} load_workflow workflows/demo_definitions/*.yaml",
            "",
            "A worker, watchdog or web server that dies is restarted. Ctrl-C stops everything.",
            "",
        ]
        self._say("\n".join(lines))

    def _login_line(self, password: str | None) -> str:
        if password is None:
            return (
                f"  Log in as   {ADMIN_USERNAME}, with the password you gave it ("
                f"{self._password_path()} is an older one; delete it and start again for a "
                "new one)"
            )
        return f"  Log in as   {ADMIN_USERNAME} / {password}   (kept in {self._password_path()})"

    def _manage_command_for_humans(self) -> str:
        """How to run manage.py against this same stack from another shell."""
        python = Path(sys.executable)
        if python.is_relative_to(settings.BASE_DIR):
            python = python.relative_to(settings.BASE_DIR)
        # Without these, another shell would talk to a different database.
        shared = [
            f"{name}={shlex.quote(os.environ[name])}"
            for name in ("KEEL_VAR_DIR", "KEEL_EMBEDDED_REDIS_SOCKET")
            if name in os.environ
        ]
        return " ".join([*shared, str(python), "manage.py"])

    # --- Supervising -------------------------------------------------------------------------

    def _supervise(self, remind: str | None = None) -> None:
        # The children's start-up lines scroll the welcome away: say where and how to log
        # in once more when they have had their say.
        remind_at = time.monotonic() + REMIND_AFTER_SECONDS
        while True:
            self._supervise_once()
            if remind_at is not None and time.monotonic() >= remind_at:
                remind_at = None
                self._say(
                    "\n".join(
                        [
                            "",
                            self.style.SUCCESS(f"Keel is running at {self.base_url}"),
                            self._login_line(remind),
                            "",
                        ]
                    )
                )
            time.sleep(0.2)

    def _supervise_once(self) -> None:
        for child in self.children:
            if child.exited:
                self._schedule_restart(child)
            elif child.restart_at is not None and time.monotonic() >= child.restart_at:
                self._spawn(child)
        if self.redis_process is not None and self.redis_process.poll() is not None:
            raise CommandError(
                f"The embedded Redis {describe_exit(self.redis_process.returncode)}; stopped "
                f"everything. See its log next to {settings.KEEL_EMBEDDED_REDIS_SOCKET}."
            )

    def _schedule_restart(self, child: Child) -> None:
        """1. Say why it stopped. 2. Stop what it left behind. 3. Restart it after a backoff."""
        child.backoff = child.next_backoff()
        child.restarts += 1
        child.last_pid = child.process.pid
        child.last_exit = describe_exit(child.process.returncode)
        child.last_exit_at = _now()
        child.restart_at = time.monotonic() + child.backoff
        self._say(
            self.style.WARNING(
                f"devstack: {child.name} (pid {child.last_pid}) {child.last_exit}; restarting "
                f"it in {child.backoff:g}s (restart #{child.restarts})"
            )
        )
        self._write_supervision_record()
        self._stop_processes(self._spawned_processes(child.spawn), [])

    def _spawned_processes(self, spawn: str | None = None) -> list[psutil.Process]:
        """Live processes started by this devstack (or by one spawn), wherever they are now.

        Found by their environment: a work horse has a process group of its own, and what a
        dead child leaves behind is re-parented away from us.
        """
        found = []
        for process in psutil.process_iter():
            try:
                value = process.environ().get(SPAWN_VARIABLE, "")
            except psutil.Error:  # gone, a zombie, or not ours to read
                continue
            if value == spawn if spawn else value.startswith(f"{self.tag}/"):
                found.append(process)
        return found

    def _stop_processes(self, processes: list[psutil.Process], children: list[Child]) -> None:
        """SIGTERM the processes and the children's groups; SIGKILL what is left after a grace."""
        signalled = set()
        for child in children:
            signalled |= child.signal_group(signal.SIGTERM)
        for process in processes:
            # Once only: a second SIGTERM makes an RQ worker kill its work horse at once.
            if process.pid not in signalled:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGTERM)

        def left() -> bool:
            return any(child.group_alive() for child in children) or any(map(_alive, processes))

        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while left() and not self.hurry and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in children:
            if child.group_alive():
                self._say(f"The {child.name} did not stop in time; killing it.")
                child.signal_group(signal.SIGKILL)
                child.process.wait()
        for process in filter(_alive, processes):
            with contextlib.suppress(psutil.Error):
                process.kill()

    def _write_supervision_record(self) -> None:
        """Write SUPERVISOR_FILE atomically: a reader sees the old record or the new one."""
        record = {
            "supervisor": "devstack",
            "pid": os.getpid(),
            "pid_started": psutil.Process().create_time(),
            "host": socket.gethostname(),
            "started_at": _iso(self.started_at),
            "updated_at": _iso(_now()),
            "processes": [child.record() for child in self.children if child.process],
        }
        path = self._supervision_path()
        try:
            descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(descriptor, "w") as file:
                    json.dump(record, file, indent=2)
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as error:  # the report goes without it; the processes must not
            self._say(self.style.ERROR(f"devstack: could not write {path}: {error}"))

    def _supervision_path(self) -> Path:
        return Path(settings.VAR_DIR) / SUPERVISOR_FILE

    # --- Stopping ----------------------------------------------------------------------------

    def _stop_everything(self) -> None:
        """Stop the children and all they started (terminate, wait, kill), then the Redis."""
        running = [child for child in self.children if child.running]
        # Also what a dead child left behind, if its clean-up was interrupted by this stop.
        self._stop_processes(self._spawned_processes(), running)
        for child in self.children:
            for reader in child.readers:
                reader.join(timeout=2)
        if self.redis_process is not None:
            embedded_redis.stop(self.redis_process)
        # Nothing is supervised any more: the system report must not say otherwise.
        path = self._supervision_path()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads(path.read_text()).get("pid") == os.getpid():  # not another devstack's
                path.unlink()
