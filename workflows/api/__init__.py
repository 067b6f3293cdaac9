"""Keel's JSON API on django-ninja; config/api.py assembles it and mounts it at /api/v1/.

* ``workflows.py``  workflows, their runs, starting a run (with a bounded wait).
* ``runs.py``       runs, events, checkpoints, a node's attempts and logs.
* ``actions.py``    one endpoint per operator action of the registry (workflows/actions.py).
* ``deployments.py`` which version new runs get: deploy, promote, abort, roll back.
* ``schemas.py``    pydantic Schemas: responses, bodies, query parameters (the document).
* ``auth.py``       bearer tokens (only a SHA-256 is stored) and session + CSRF.
* ``errors.py``     every failure as ``{"error": {"code", "message", "field"}}``.
* ``pages.py``, ``lookups.py``, ``idempotency.py``, ``parser.py``: keyset pages, 404s that
  say where to look, the Idempotency-Key header, JSON-object bodies.

Every change goes through the operations, like the dashboard, admin and commands.
"""
