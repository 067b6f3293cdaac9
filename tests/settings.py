"""Settings for the test suite: the real settings, plus test node types and a sink app.

Tests run against whatever DATABASE_URL / REDIS_URL say (PostgreSQL and the machine's
Redis in CI); without them, SQLite and an embedded Redis of the suite's own.
"""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("DEBUG", "1")
os.environ["KEEL_VAR_DIR"] = str(
    Path(os.environ.get("KEEL_VAR_DIR") or _BASE / "var" / "test").resolve()
)
os.environ.setdefault(
    "KEEL_NODE_MODULES", "workflows.nodes.builtin,workflows.nodes.demo,tests.nodes"
)
os.environ.setdefault("KEEL_HEARTBEAT_SECONDS", "1")
os.environ.setdefault(
    "KEEL_EMBEDDED_REDIS_SOCKET", str(Path(os.environ["KEEL_VAR_DIR"]) / "redis.sock")
)

if not os.environ.get("REDIS_URL"):
    from config import embedded_redis

    # Started once and left running between test sessions; the socket is the suite's own.
    embedded_redis.start(Path(os.environ["KEEL_EMBEDDED_REDIS_SOCKET"]))
    os.environ["REDIS_URL"] = embedded_redis.socket_url(
        Path(os.environ["KEEL_EMBEDDED_REDIS_SOCKET"])
    )

from config.settings import *  # noqa: E402, F403
from config.settings import INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
