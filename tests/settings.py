"""Settings for the test suite: the real settings, plus test node types and a sink app.

Tests run against whatever DATABASE_URL / REDIS_URL say (PostgreSQL and the machine's
Redis in CI); without them, SQLite and an embedded Redis. Either way each pytest process
has its own Redis database, test database and var directory (tests/isolation.py).
"""

import os

from tests import isolation

os.environ.setdefault("DEBUG", "1")
os.environ.setdefault(
    "KEEL_NODE_MODULES", "workflows.nodes.builtin,workflows.nodes.demo,tests.nodes"
)
os.environ.setdefault("KEEL_HEARTBEAT_SECONDS", "1")
if isolation.needed():
    isolation.isolate()

from config.settings import *  # noqa: F403
from config.settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Two runs on one server must not share test_<name> (xdist adds _gw0, _gw1 to this).
    DATABASES["default"]["TEST"] = {
        "NAME": f"test_{DATABASES['default']['NAME']}_{os.environ['KEEL_TEST_RUN']}"
    }
