"""``manage.py devstack`` supervises: a dead worker or watchdog comes back, the web stays up.

Each test boots the laptop default as ``make run`` does (SQLite and an embedded Redis in a
var dir of its own), kills a child for real, reads what devstack printed and recorded and
what the system report shows, and ends with SIGTERM: exit 0 and nothing left running.
"""

import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest

from diagnostics import system_report
from tests.conftest import wait_for

BASE_DIR = Path(__file__).resolve().parents[2]
# A node that runs for a minute in a work horse, so the killed worker leaves one behind.
LONG_NODE = """\
name: Long step
slug: long-step
nodes:
  work: {type: demo.slow_steps, params: {steps: 300, step_seconds: 0.2}, timeout: 120}
"""

pytestmark = [pytest.mark.workers, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def own_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class Devstack:
    """One ``manage.py devstack --no-demo-runs`` in a var dir of its own."""

    def __init__(self, var_dir: Path, *, demo_runs: bool = False):
        self.var_dir = var_dir
        self.demo_runs = demo_runs
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = var_dir / "devstack.log"
        # The laptop default, as .ci/run starts it: none of the test suite's own settings.
        self.env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("KEEL_")
            and name not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
        }
        self.env.update(DEBUG="1", KEEL_VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "devstack",
                    *([] if self.demo_runs else ["--no-demo-runs"]),
                    "--port",
                    str(self.port),
                ],
                cwd=BASE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.web_answers, timeout=180, interval=0.3, message="devstack's web server")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_running(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"devstack exited with {self.process.returncode}:\n{self.log()}")

    def web_answers(self) -> bool:
        self.check_running()
        try:
            with urllib.request.urlopen(f"{self.base_url}/admin/login/", timeout=10) as answer:
                return answer.status == 200
        except OSError:
            return False

    def record(self) -> dict:
        """var/supervisor.json as devstack last wrote it ({} before the first write)."""
        try:
            return json.loads((self.var_dir / "supervisor.json").read_text())
        except FileNotFoundError:
            return {}

    def running(self, name: str) -> dict | None:
        """The supervised process ``name`` if it is up, else None."""
        self.check_running()
        for row in self.record().get("processes", []):
            if row["name"] == name and row["state"] == "running" and row["pid"]:
                return row
        return None

    def restarted(self, name: str, old_pid: int, restarts: int) -> dict | None:
        row = self.running(name)
        if row and row["pid"] != old_pid and row["restarts"] == restarts:
            return row
        return None

    def manage(self, *args: str, env: dict | None = None) -> str:
        """Run ``manage.py`` against this devstack's database and Redis, as an operator would."""
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=BASE_DIR,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"manage.py {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def system_page(self) -> str:
        """The System page as the admin sees it, through a real login."""
        password = (self.var_dir / "admin-password").read_text().strip()
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        login = opener.open(f"{self.base_url}/login/", timeout=30).read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login).group(1)
        form = {"username": "admin", "password": password, "csrfmiddlewaretoken": token}
        opener.open(f"{self.base_url}/login/", data=urlencode(form).encode(), timeout=30)
        page = opener.open(f"{self.base_url}/system/", timeout=60)
        assert page.url.endswith("/system/"), f"not logged in: ended at {page.url}"
        return page.read().decode()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)

    def leftovers(self) -> list[str]:
        """Processes that inherited this var dir, as .ci/run looks for them."""
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                if process.environ().get("KEEL_VAR_DIR") == str(self.var_dir):
                    found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])}")
            except psutil.Error:
                pass
        return found

    def kill_everything(self) -> None:
        """Teardown: whatever a failed test left running, devstack included."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for process in psutil.process_iter():
            try:
                if process.environ().get("KEEL_VAR_DIR") == str(self.var_dir):
                    process.kill()
            except psutil.Error:
                pass


class WebWatcher(threading.Thread):
    """Asks the web server for a page every 0.1 s until stopped; remembers each failure."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.url = f"{base_url}/admin/login/"
        self.done = threading.Event()
        self.answers = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    answer.read()
                self.answers += 1
            except OSError as error:
                self.failures.append(repr(error))
            self.done.wait(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)


@pytest.fixture
def devstack():
    # Short and outside the repository: the embedded Redis's unix socket lives in it.
    var_dir = Path(tempfile.mkdtemp(prefix="keel-devstack-"))
    stack = Devstack(var_dir)
    try:
        stack.start()
        yield stack
    finally:
        stack.kill_everything()
        shutil.rmtree(var_dir, ignore_errors=True)


def assert_stops_cleanly(devstack: Devstack) -> None:
    """SIGTERM: exit 0, no process left behind, no record saying something is supervised."""
    assert devstack.stop() == 0, devstack.log()
    assert devstack.leftovers() == [], devstack.log()
    assert devstack.record() == {}
    assert devstack.log().rstrip().endswith("Stopped.")
    report = json.loads(devstack.manage("system_report", "--json"))
    assert report["supervision"]["supervised"] is False


def test_a_killed_worker_is_restarted_and_the_system_report_shows_it(devstack):
    worker = wait_for(lambda: devstack.running("worker"), message="the worker to be recorded")
    web = devstack.running("web")
    definition = devstack.var_dir / "long-step.yaml"
    definition.write_text(LONG_NODE)
    devstack.manage("load_workflow", str(definition))
    devstack.manage("run_workflow", "long-step")
    # RQ puts the horse in a process group of its own: out of reach of a killpg.
    (horse,) = wait_for(
        lambda: [
            child
            for child in psutil.Process(worker["pid"]).children()
            if child.pid == own_group(child.pid)
        ],
        timeout=60,
        message="the worker to fork a work horse",
    )
    watcher = WebWatcher(devstack.base_url)
    watcher.start()
    try:
        assert alive(horse.pid)
        os.kill(worker["pid"], signal.SIGKILL)

        line = (
            f"devstack: worker (pid {worker['pid']}) was killed by SIGKILL; "
            "restarting it in 1s (restart #1)"
        )
        wait_for(lambda: line in devstack.log(), message="devstack to say why it restarts")
        # What the dead worker left behind is stopped, not left running the node.
        wait_for(lambda: not alive(horse.pid), message="the orphaned work horse to be stopped")
        new = wait_for(
            lambda: devstack.restarted("worker", worker["pid"], 1),
            message="the worker to be restarted",
        )
        assert "rqworker" in " ".join(psutil.Process(new["pid"]).cmdline())
        assert new["last_exit"] == "was killed by SIGKILL"
        assert new["last_exit_pid"] == worker["pid"]
    finally:
        watcher.stop()
    assert watcher.answers > 0 and watcher.failures == [], watcher.failures
    assert devstack.running("web")["pid"] == web["pid"]
    assert devstack.running("web")["restarts"] == 0

    # The operator's view: the report (JSON) and the System page.
    def report_shows_new_worker():
        report = json.loads(devstack.manage("system_report", "--json"))
        live = [w for w in report["workers"] if w["pid"] == new["pid"] and w["alive"]]
        return report if live else None

    report = wait_for(report_shows_new_worker, message="the new worker to register in RQ")
    supervision = report["supervision"]
    assert supervision["supervised"] is True and supervision["stale"] is False
    (row,) = [row for row in supervision["processes"] if row["name"] == "worker"]
    assert row["pid"] == new["pid"] and row["restarts"] == 1
    assert row["last_exit"] == "was killed by SIGKILL"
    page = devstack.system_page()
    assert "Supervised processes" in page
    assert f"pid {worker['pid']} was killed by SIGKILL" in page
    text = devstack.manage("system_report")
    supervised = text.split("Supervised processes", 1)[1].split("Open findings", 1)[0]
    assert "worker" in supervised and "was killed by SIGKILL at" in supervised

    assert_stops_cleanly(devstack)


def test_a_stopped_then_killed_watchdog_is_restarted_with_a_longer_backoff(devstack):
    first = wait_for(lambda: devstack.running("watchdog"), message="the watchdog to be recorded")
    worker = devstack.running("worker")
    # SIGTERM before its handler is installed (Django still loading, on a busy machine)
    # would kill it rather than stop it: wait for the line it prints once it listens.
    wait_for(
        lambda: "watchdog: one tick every" in devstack.log(),
        message="the watchdog to install its signal handlers",
    )

    os.kill(first["pid"], signal.SIGTERM)  # to it alone: it stops cleanly, devstack does not
    wait_for(
        lambda: (
            f"devstack: watchdog (pid {first['pid']}) exited with code 0; restarting it in "
            "1s (restart #1)" in devstack.log()
        ),
        message="devstack to say the watchdog exited",
    )
    second = wait_for(
        lambda: devstack.restarted("watchdog", first["pid"], 1),
        message="the watchdog to be restarted",
    )

    # Down again soon after its restart: the backoff doubles.
    os.kill(second["pid"], signal.SIGKILL)
    wait_for(
        lambda: (
            f"devstack: watchdog (pid {second['pid']}) was killed by SIGKILL; restarting it "
            "in 2s (restart #2)" in devstack.log()
        ),
        message="devstack to say the watchdog was killed",
    )
    third = wait_for(
        lambda: devstack.restarted("watchdog", second["pid"], 2),
        message="the watchdog to be restarted again",
    )
    assert "watchdog" in " ".join(psutil.Process(third["pid"]).cmdline())
    assert devstack.running("worker")["pid"] == worker["pid"]
    report = json.loads(devstack.manage("system_report", "--json"))
    (row,) = [row for row in report["supervision"]["processes"] if row["name"] == "watchdog"]
    assert (row["pid"], row["restarts"], row["last_exit"]) == (
        third["pid"],
        2,
        "was killed by SIGKILL",
    )

    assert_stops_cleanly(devstack)


def test_the_report_survives_a_corrupt_or_stale_record(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    record = tmp_path / "supervisor.json"
    assert system_report.supervision()["supervised"] is False  # no file: not devstack's

    record.write_text('{"processes": [')  # cut short
    state = system_report.supervision()
    assert state["supervised"] is False and "could not be read" in state["error"]

    # Written by a devstack that was killed (kill -9 leaves its record behind).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record.write_text(
        json.dumps(
            {
                "pid": gone.pid,
                "host": socket.gethostname(),
                "processes": [{"name": "worker", "pid": "?", "restarts": 2, "started_at": "?"}],
            }
        )
    )
    state = system_report.supervision()
    assert state["supervised"] is True and state["stale"] is True
    (row,) = state["processes"]
    assert (row["name"], row["pid"], row["restarts"], row["started_at"]) == (
        "worker",
        None,
        2,
        None,
    )


def test_a_second_start_keeps_the_password_the_demos_and_the_operators_version(tmp_path):
    var_dir = Path(tempfile.mkdtemp(prefix="keel-devstack-"))
    stack = Devstack(var_dir, demo_runs=True)
    demos = sorted(path.stem for path in (BASE_DIR / "workflows/demo_definitions").glob("*.yaml"))
    count = (
        "from workflows.models import Run, Workflow; "
        "print(Run.objects.filter(trigger='devstack').count(), "
        "Workflow.objects.get(slug='fan-out').versions.count())"
    )
    try:
        stack.start()
        wait_for(lambda: "Keel is running at" in stack.log(), timeout=60, message="reminder")
        password = (var_dir / "admin-password").read_text()
        assert stack.manage("shell", "-v", "0", "-c", count).split() == [str(len(demos)), "1"]
        # The operator edits a demo workflow: v2 is theirs.
        edited = tmp_path / "fan_out.yaml"
        source = (BASE_DIR / "workflows/demo_definitions/fan_out.yaml").read_text()
        edited.write_text(source.replace("\ndescription: ", "\ndescription: Mine. ", 1))
        stack.manage("load_workflow", str(edited))
        assert stack.stop() == 0, stack.log()

        stack.start()  # the second `make run`
        wait_for(lambda: "Keel is running at" in stack.log(), timeout=60, message="reminder")
        log = stack.log()
        assert (var_dir / "admin-password").read_text() == password, "not rotated"
        assert "Started run" not in log, "demo runs only on the first start"
        assert "fan-out v2 unchanged" in log, "the operator's version stays the latest"
        assert stack.manage("shell", "-v", "0", "-c", count).split() == [str(len(demos)), "2"]
        assert "Log in as   admin / " + password.strip() in log
        assert "System" in stack.system_page(), "the kept password signs in"
        # A second shell as README shows it: no DEBUG, no SECRET_KEY.
        plain = {name: value for name, value in stack.env.items() if name != "DEBUG"}
        assert "fan-out" in stack.manage("show_run", "1", env=plain)
    finally:
        stack.kill_everything()
        shutil.rmtree(var_dir, ignore_errors=True)
