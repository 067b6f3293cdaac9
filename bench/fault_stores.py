"""Throwaway stores for the fault bench and tests: a redis-server and a PostgreSQL cluster
of their own, on free ports, safe to flush, kill and restart."""

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


class ThrowawayRedis:
    """A redis-server of our own on a free TCP port: safe to FLUSHALL, kill or restart.

    It keeps nothing on disk, so a restart brings it back empty (as a Redis without
    persistence, or a failover to an empty replica)."""

    def __init__(self, directory: Path, *extra_args: str):
        self.port = free_port()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.extra_args = extra_args
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        from config import embedded_redis

        process = subprocess.Popen(
            embedded_redis.server_command(
                self.directory,
                ["--port", str(self.port), "--bind", "127.0.0.1"],
                self.directory / f"redis-{self.port}.log",
                *self.extra_args,
            ),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.answers():
            if time.monotonic() > deadline or process.poll() is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=10)
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return process

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def answers(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def restart(self, down_seconds: float) -> None:
        """Kill the server (no shutdown, no save), keep it down, start it again, empty,
        on the same port."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def start(self) -> None:
        """Start it again (after ``stop``) on the same port, empty."""
        self.process = self._start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def postgres_bin_dir() -> tuple[Path | None, str]:
    """(the newest PostgreSQL server bin directory with initdb and pg_ctl, "") or (None,
    why not)."""
    found = [
        Path(path)
        for path in glob.glob(POSTGRES_BIN_GLOB)
        if os.access(Path(path) / "initdb", os.X_OK) and os.access(Path(path) / "pg_ctl", os.X_OK)
    ]
    if not found:
        return None, f"no initdb and pg_ctl in {POSTGRES_BIN_GLOB} (install the PostgreSQL server)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return None, "running as root, and there is no postgres user to run the server as"
        if not shutil.which("runuser"):
            return None, "running as root, and runuser is missing"
    newest = max(found, key=lambda path: int(path.parent.name.split(".")[0]))
    return newest, ""


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl), on a free port on 127.0.0.1,
    trust authentication, fsync off: for a bench that restarts its database.

    As root the server runs as the postgres user (it refuses to run as root)."""

    def __init__(self, bin_dir: Path):
        import pwd

        self.bin_dir = Path(bin_dir)
        self.port = free_port()
        # Our own directory, not under a root-only temporary one: postgres must enter it.
        self.root = Path(tempfile.mkdtemp(prefix="keel-faults-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
        if os.geteuid() == 0:
            # initdb ran as postgres; the config we appended to is its file still.
            os.chown(self.data / "postgresql.conf", entry.pw_uid, entry.pw_gid)
        self.pg_ctl("start")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command,
            cwd=self.root if os.geteuid() != 0 else "/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )

    def pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w", *args)

    def restart(self, down_seconds: float = 0.0) -> None:
        """``pg_ctl restart -m fast`` (sessions ended, a checkpoint, the server up again);
        with ``down_seconds``, stop, stay down that long, then start."""
        if down_seconds <= 0:
            self.pg_ctl("restart", "-m", "fast")
            return
        self.pg_ctl("stop", "-m", "fast")
        time.sleep(down_seconds)
        self.pg_ctl("start")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)
