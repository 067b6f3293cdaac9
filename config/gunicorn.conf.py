"""Gunicorn settings for Keel's web server, read from the environment.

``make run`` (``manage.py devstack``) starts gunicorn with this file on 127.0.0.1.

In production, run it the same way behind a reverse proxy that terminates TLS::

    DEBUG=0 SECRET_KEY=... ALLOWED_HOSTS=keel.example.com DATABASE_URL=postgres://...
    REDIS_URL=redis://... KEEL_BIND=0.0.0.0:8000 KEEL_WEB_WORKERS=4
    python manage.py collectstatic --noinput   # once per deploy: WhiteNoise serves var/static
    gunicorn -c config/gunicorn.conf.py

Size KEEL_WEB_WORKERS at about 2 x cores + 1; the pages are short database reads, and long
work belongs to the RQ workers, never to a request.
"""

import os


def _env_int(name: str, default: int) -> int:
    # Django's config.env is not importable here: gunicorn reads this file before the app.
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"{name}={raw!r} must be a whole number of at least 1.")
    return int(raw)


wsgi_app = "config.wsgi:application"
# A comma-separated list binds several addresses, e.g. "127.0.0.1:8000,unix:/run/keel.sock".
bind = [address.strip() for address in os.environ.get("KEEL_BIND", "127.0.0.1:8000").split(",")]
workers = _env_int("KEEL_WEB_WORKERS", 2)
# Threads, because an API start request may wait up to 180 s for its run (POST
# /api/v1/workflows/<slug>/runs with "wait"): a waiting request must neither block the
# dashboard nor be killed as a stuck worker.
worker_class = "gthread"
threads = _env_int("KEEL_WEB_THREADS", 8)
# Above the longest API wait; a request still running after this is stuck and gets restarted.
timeout = 200
# Both logs to the process's output: the container runtime or devstack collects them.
accesslog = "-"
errorlog = "-"
# Gunicorn >= 25.1 opens a control socket at one fixed path per user, so a second instance
# (two devstacks, CI beside a developer) would fight over it; Keel does not use gunicornc.
control_socket_disable = True


def post_worker_init(worker):
    """Move what the worker built at start (Django, the app's modules) out of the garbage
    collector's sight: a full collection then scans a request's objects, not the whole
    app. A 1 000-node run page's p95 was half again its median, all of it collections."""
    import gc

    gc.collect()
    gc.freeze()
