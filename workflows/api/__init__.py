"""Keel's JSON API under /api/v1/ (plain Django views, no framework).

* ``urls.py``        routes; anything else under /api/v1/ is a JSON 404.
* ``http.py``        the ``endpoint`` decorator: method check, authentication, permission,
                     and every failure turned into a JSON error (``errors.py``).
* ``auth.py``        bearer tokens (only a SHA-256 is stored) and session + CSRF.
* ``inputs.py``      request fields, declared once: validated here, documented in openapi.py.
* ``serializers.py`` the JSON shapes of workflows, runs, nodes, attempts, logs, events.
* ``views.py``       parse input, call one operation or read, present JSON.
* ``openapi.py``     the OpenAPI 3 document served at /api/v1/openapi.json; the response
                     shapes in it come from ``schemas.py``.

Every change goes through workflows/operations.py, like the dashboard, admin and commands.
"""
