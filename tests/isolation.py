"""Each pytest process gets its own Redis database, test database and var directory.

So that two `make test` runs (or `pytest -n 2`'s workers) on one machine never touch each
other's jobs, rows or files. Called from tests/settings.py once per pytest process; the RQ
workers and commands a test starts inherit the environment and skip it.
"""

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

# Not under rq:* or keel:*, which the clean_redis fixture deletes.
CLAIM_KEY = "keel-test-claim"
# Marks a database as the test suite's own: its leftovers are jobs of earlier test runs,
# which each test clears anyway. A database without it that holds keys is someone else's.
MARK_KEY = "keel-test-database"
CLAIM_SECONDS = 6 * 3600  # outlives any run; a crashed run's claim expires by itself
MARKER = "KEEL_TEST_ISOLATED"


def process_id() -> str:
    """ "main" for a plain pytest process, "gw0", "gw1"… for xdist workers."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def needed() -> bool:
    # Subprocesses inherit the marker of the pytest process that started them; an xdist
    # worker inherits its controller's, which names another process.
    return os.environ.get(MARKER) != process_id()


def isolate() -> None:
    """Point this process (and what it starts) at its own var dir and Redis database."""
    var_dir = Path(tempfile.mkdtemp(prefix=f"keel-test-{process_id()}-"))
    atexit.register(shutil.rmtree, var_dir, ignore_errors=True)
    os.environ["KEEL_VAR_DIR"] = str(var_dir)
    os.environ["KEEL_TEST_RUN"] = uuid.uuid4().hex[:8]  # names the PostgreSQL test database
    # What the developer asked for; an xdist worker inherits its controller's choice here.
    base = os.environ.setdefault("KEEL_TEST_REDIS_BASE", os.environ.get("REDIS_URL", ""))
    if base:
        os.environ["REDIS_URL"] = claim_database(base)
    else:
        os.environ.pop("KEEL_EMBEDDED_REDIS_SOCKET", None)
        os.environ["REDIS_URL"] = start_embedded_redis(var_dir)
    os.environ[MARKER] = process_id()


def claim_database(url: str) -> str:
    """The URL with a database number no other live test run holds, claimed until exit.

    The URL's own number comes first. A database is taken when it is empty or marked as a
    test database; one that holds someone else's keys is never touched.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        raise RuntimeError("REDIS_URL for tests must be redis://host:port/db, not a socket")
    first = int(parts.path.strip("/") or 0)
    client = redis.Redis.from_url(url)
    databases = int(client.config_get("databases").get("databases", 16))
    token = f"{os.getpid()}:{uuid.uuid4().hex}"
    for number in [first, *(n for n in range(databases - 1, 0, -1) if n != first)]:
        candidate = redis.Redis.from_url(urlunsplit(parts._replace(path=f"/{number}")))
        if not candidate.set(CLAIM_KEY, token, nx=True, ex=CLAIM_SECONDS):
            continue
        if candidate.dbsize() > 1 and not candidate.exists(MARK_KEY):
            candidate.delete(CLAIM_KEY)  # someone else's data
            continue
        candidate.set(MARK_KEY, "1")
        atexit.register(_release, candidate, token)
        return urlunsplit(parts._replace(path=f"/{number}"))
    raise RuntimeError(
        f"No free Redis database on {parts.hostname}:{parts.port}: each is claimed by another "
        f"test run or holds keys that are not the test suite's. Stop the other runs, delete the "
        f"{CLAIM_KEY!r} key of a run that crashed, or point REDIS_URL at an empty database."
    )


def _release(client: redis.Redis, token: str) -> None:
    try:
        if client.get(CLAIM_KEY) == token.encode():
            client.delete(CLAIM_KEY)
    except redis.RedisError:
        pass


def start_embedded_redis(var_dir: Path) -> str:
    """This process's own embedded redis-server, stopped when the process exits."""
    from config import embedded_redis

    socket_path = var_dir / "redis.sock"
    process = embedded_redis.start(socket_path)
    atexit.register(embedded_redis.stop, process)
    os.environ["KEEL_TEST_REDIS_PID"] = str(process.pid)
    return embedded_redis.socket_url(socket_path)
