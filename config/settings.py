"""Keel settings, read from the environment.

Defaults work on a laptop: SQLite under var/, the embedded Redis (see
config/embedded_redis.py) and a secret key of its own in var/secret-key. Production sets
DATABASE_URL, REDIS_URL, SECRET_KEY and DEBUG=0; a bad or missing value raises
ImproperlyConfigured naming the variable.
"""

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config import embedded_redis
from config.env import env_bool, env_float, env_int, env_list, env_str, local_secret

BASE_DIR = Path(__file__).resolve().parent.parent
# Absolute: it goes into URLs (unix://…) and is shared with subprocesses started elsewhere.
VAR_DIR = Path(env_str("KEEL_VAR_DIR") or BASE_DIR / "var").resolve()

DEBUG = env_bool("DEBUG", False)

# The laptop setup (neither DATABASE_URL nor REDIS_URL: SQLite and the embedded Redis under
# var/) makes a secret key of its own, kept in var/secret-key, so every shell and process of
# `make run` signs alike, DEBUG or not. Anywhere else SECRET_KEY is required with DEBUG off.
LAPTOP = not env_str("DATABASE_URL") and not env_str("REDIS_URL")
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if LAPTOP:
        SECRET_KEY = local_secret(VAR_DIR / "secret-key")
    elif not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is required when DEBUG is off. Set SECRET_KEY to a long random string "
            "(python -c 'import secrets; print(secrets.token_urlsafe(50))'). Only the laptop "
            "setup, without DATABASE_URL and REDIS_URL, makes its own (in var/secret-key)."
        )
    else:
        SECRET_KEY = "keel-insecure-development-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "django_rq",
    "axes",
    "workflows",
    "diagnostics",
    "dashboard",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "config.security.ContentSecurityPolicyMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Last, as django-axes asks: it answers a locked-out sign-in.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


# --- Database ---------------------------------------------------------------------------------


def _database_from_env() -> dict:
    url = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'keel.sqlite3'}"
    try:
        database = dj_database_url.parse(url, conn_max_age=env_int("KEEL_DB_CONN_MAX_AGE", 60))
    except ValueError as error:
        raise ImproperlyConfigured(
            f"DATABASE_URL is not a database URL Keel understands: {error}"
        ) from None
    engine = database["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        database["OPTIONS"] = {
            # Writers take the lock when they begin, so two writers queue instead of
            # failing with "database is locked" when a read lock would need upgrading.
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            # WAL is a property of the file, set once by migrate (workflows/apps.py);
            # asking for it on every connection cost each work horse ~0.8 ms.
            "init_command": "PRAGMA synchronous=NORMAL;",
        }
        # A file, not :memory:, so RQ worker subprocesses in tests share the test database.
        database["TEST"] = {"NAME": str(VAR_DIR / "test-keel.sqlite3")}
    elif engine == "django.db.backends.postgresql":
        database["CONN_HEALTH_CHECKS"] = True
        # Django turns psycopg's prepared statements off (None), for connection poolers.
        # Its cursors bind on the client and are never prepared anyway; the engine's
        # named statements bind on the server and are prepared once they have run this
        # many times on a connection (workflows/engine/statements.py). Behind PgBouncer
        # in transaction mode, set its max_prepared_statements (1.21 or later).
        database.setdefault("OPTIONS", {}).setdefault("prepare_threshold", 5)
    else:
        raise ImproperlyConfigured(
            f"DATABASE_URL names {engine}; Keel supports PostgreSQL (postgres://...) and SQLite (sqlite:///...)."
        )
    return database


DATABASES = {"default": _database_from_env()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# --- Redis and RQ -----------------------------------------------------------------------------

REDIS_URL = env_str("REDIS_URL") or ""
KEEL_EMBEDDED_REDIS = not REDIS_URL
if KEEL_EMBEDDED_REDIS:
    KEEL_EMBEDDED_REDIS_SOCKET = embedded_redis.default_socket_path(VAR_DIR)
    REDIS_URL = embedded_redis.socket_url(KEEL_EMBEDDED_REDIS_SOCKET)
elif not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(
        "REDIS_URL must start with redis://, rediss:// or unix:// (its value is not shown: it may hold a password), "
        "or be left unset to use the embedded Redis."
    )

# Node priorities map to these queues; a worker lists them in this order.
KEEL_QUEUES = ["high", "default", "low"]

RQ_QUEUES = {
    name: {
        "URL": REDIS_URL,
        "DEFAULT_TIMEOUT": 3600,
        # JSON only: nothing pickled crosses Redis.
        "SERIALIZER": "rq.serializers.JSONSerializer",
    }
    for name in KEEL_QUEUES
}
RQ = {
    "COMMIT_MODE": "on_db_commit",
    "WORKER_CLASS": "workflows.runtime.worker.KeelWorker",
}


# --- Keel engine knobs ------------------------------------------------------------------------

KEEL_HEARTBEAT_SECONDS = env_int("KEEL_HEARTBEAT_SECONDS", 5, minimum=1, maximum=300)
KEEL_DEFAULT_TIMEOUT = env_int("KEEL_DEFAULT_TIMEOUT", 30, minimum=1, maximum=3600)
KEEL_MAX_TIMEOUT = env_int("KEEL_MAX_TIMEOUT", 3600, minimum=1, maximum=86400)
if KEEL_DEFAULT_TIMEOUT > KEEL_MAX_TIMEOUT:
    raise ImproperlyConfigured(
        f"KEEL_DEFAULT_TIMEOUT={KEEL_DEFAULT_TIMEOUT} is above KEEL_MAX_TIMEOUT={KEEL_MAX_TIMEOUT}."
    )
# Hard timeouts are Keel's: at a node's timeout its process is asked to stop (SIGTERM), and
# killed (SIGKILL) this many seconds later if it has not; a superseded attempt likewise.
KEEL_KILL_GRACE_SECONDS = env_int("KEEL_KILL_GRACE_SECONDS", 5, minimum=1, maximum=300)
# How long one compensate hook may run during a rollback before the rollback gives up.
KEEL_COMPENSATE_TIMEOUT_SECONDS = env_int(
    "KEEL_COMPENSATE_TIMEOUT_SECONDS", 60, minimum=1, maximum=3600
)
# How long the process that ran a node keeps trying to commit its outcome while the
# database is unreachable, before it gives up and leaves the attempt to the watchdog.
KEEL_REPORT_RETRY_SECONDS = env_int("KEEL_REPORT_RETRY_SECONDS", 600, minimum=1, maximum=86400)
KEEL_WATCHDOG_SECONDS = env_int("KEEL_WATCHDOG_SECONDS", 2, minimum=1, maximum=300)
# Blue-green: how long the previous version stays the instant rollback target once the
# new one has taken over (a later rollback to any version stays possible).
KEEL_BLUE_GREEN_RETENTION_SECONDS = env_int(
    "KEEL_BLUE_GREEN_RETENTION_SECONDS", 3600, minimum=0, maximum=30 * 86400
)
KEEL_MAX_OUTPUT_BYTES = env_int("KEEL_MAX_OUTPUT_BYTES", 64 * 1024, minimum=1024)
KEEL_MAX_LOG_LINES = env_int("KEEL_MAX_LOG_LINES", 1000, minimum=10)
KEEL_MAX_LOG_LINE_CHARS = env_int("KEEL_MAX_LOG_LINE_CHARS", 2000, minimum=80)
# Modules whose import registers node types (see workflows/definitions/registry.py).
KEEL_NODE_MODULES = env_list(
    "KEEL_NODE_MODULES", ["workflows.nodes.builtin", "workflows.nodes.demo"]
)
KEEL_DATA_DIR = Path(env_str("KEEL_DATA_DIR") or VAR_DIR / "data")

# --- Diagnostics thresholds (diagnostics/detectors) ---------------------------------------------

# A running node is stale after this many missed heartbeats; stalled after this many beats
# without progress (slow is not stuck).
KEEL_STALE_BEATS = env_int("KEEL_STALE_BEATS", 3, minimum=2, maximum=100)
KEEL_STALLED_BEATS = env_int("KEEL_STALLED_BEATS", 12, minimum=2, maximum=10_000)
# Overdue: running longer than this factor times the expected duration, or than the p95 of the node's
# history once it has this many past successful runs.
KEEL_OVERDUE_FACTOR = env_float("KEEL_OVERDUE_FACTOR", 2.0, minimum=1.0, maximum=100.0)
KEEL_OVERDUE_HISTORY_MIN = env_int("KEEL_OVERDUE_HISTORY_MIN", 10, minimum=1)
KEEL_BACKLOG_LENGTH = env_int("KEEL_BACKLOG_LENGTH", 1000, minimum=1)
KEEL_BACKLOG_AGE_SECONDS = env_int("KEEL_BACKLOG_AGE_SECONDS", 600, minimum=1)
KEEL_NO_WORKER_GRACE_SECONDS = env_int("KEEL_NO_WORKER_GRACE_SECONDS", 10, minimum=0)
KEEL_POOL_WAIT_SECONDS = env_int("KEEL_POOL_WAIT_SECONDS", 60, minimum=0)
KEEL_LOST_JOB_GRACE_SECONDS = env_int("KEEL_LOST_JOB_GRACE_SECONDS", 5, minimum=0)
KEEL_PRESSURE_CPU_PERCENT = env_int("KEEL_PRESSURE_CPU_PERCENT", 90, minimum=1, maximum=100)
KEEL_PRESSURE_IOWAIT_PERCENT = env_int("KEEL_PRESSURE_IOWAIT_PERCENT", 50, minimum=1, maximum=100)
# 0: the memory of the host the node runs on.
KEEL_RSS_LIMIT_BYTES = env_int("KEEL_RSS_LIMIT_BYTES", 0, minimum=0)
KEEL_RSS_NEAR_RATIO = env_float("KEEL_RSS_NEAR_RATIO", 0.9, minimum=0.1, maximum=1.0)
KEEL_REDIS_MEMORY_RATIO = env_float("KEEL_REDIS_MEMORY_RATIO", 0.9, minimum=0.1, maximum=1.0)
KEEL_DB_CONNECTIONS_RATIO = env_float("KEEL_DB_CONNECTIONS_RATIO", 0.9, minimum=0.1, maximum=1.0)
# deployment_stuck: a blue-green validation running this long, or a canary step this old
# without the finished runs it needs to be judged.
KEEL_VALIDATION_STUCK_SECONDS = env_int("KEEL_VALIDATION_STUCK_SECONDS", 1800, minimum=1)
KEEL_CANARY_STEP_STUCK_SECONDS = env_int("KEEL_CANARY_STEP_STUCK_SECONDS", 3600, minimum=1)


# --- Auth, i18n, static -----------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Keel's own sign-in page: operators need not be Django staff to use the dashboard.
LOGIN_URL = "login"

# Sign-in throttling (django-axes): after KEEL_LOGIN_FAILURE_LIMIT failed sign-ins of one
# user name from one address (the dashboard's and the admin's), that pair is refused for
# KEEL_LOGIN_LOCKOUT_MINUTES; a success clears the count. `manage.py axes_reset_username
# NAME` lifts a lockout. The address is REMOTE_ADDR: behind a proxy, the proxy's.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("KEEL_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("KEEL_LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
LOGIN_REDIRECT_URL = "dashboard:overview"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE") or "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns about a missing one
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the apps' static folders without collectstatic on a laptop.
WHITENOISE_USE_FINDERS = DEBUG

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)

# HTTPS, for a deployment that serves it (off by default: a laptop serves plain HTTP).
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Behind a proxy that ends TLS: the header it sets and the value meaning HTTPS, e.g.
# "X-Forwarded-Proto: https". Only set it when the proxy always sets (or strips) it.
_proxy_header = env_str("SECURE_PROXY_SSL_HEADER") or ""
if _proxy_header:
    _name, _, _value = _proxy_header.partition(":")
    if not _name.strip() or not _value.strip():
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER={_proxy_header!r} is not 'Header-Name: value'; use e.g. "
            "'X-Forwarded-Proto: https'."
        )
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + _name.strip().upper().replace("-", "_"),
        _value.strip(),
    )

# Scripts and styles from this origin only (config/security.py); "" sends no header.
KEEL_CONTENT_SECURITY_POLICY = env_str(
    "KEEL_CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'",
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL") or "INFO"},
}
