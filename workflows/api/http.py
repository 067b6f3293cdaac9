"""The decorator every API view wears: method, authentication, permission, errors."""

import logging
from functools import wraps

import redis
from django.core.exceptions import RequestDataTooBig
from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from workflows import operations
from workflows.api import auth
from workflows.api.errors import ApiError, error_response

logger = logging.getLogger(__name__)

VIEW_PERMISSION = "workflows.view_run"
OPERATE_PERMISSION = operations.OPERATE_PERMISSION


def endpoint(*methods: str, permission: str | None = VIEW_PERMISSION, public: bool = False):
    """Wrap an API view.

    1. A method the URL does not take → 405 with ``Allow`` (before asking who is calling).
    2. Authenticate: a bearer token (CSRF-exempt) or a session (CSRF checked on POST) → 401/403.
    3. Check ``permission`` → 403. Action views pass None: they ask for view *or* operate,
       and leave the operate check to the operation, which records a denial in the run's
       history.
    4. Call the view; ApiError, OperationDenied, an unreachable database or Redis, and any
       unexpected exception all become JSON errors.
    """
    allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())
    allow_header = ", ".join(sorted(allowed | {"OPTIONS"}))

    def decorator(view):
        @csrf_exempt  # auth.authenticate() enforces CSRF itself, for sessions only
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method == "OPTIONS":
                response = HttpResponse(status=204)
                response["Allow"] = allow_header
                return response
            if request.method not in allowed:
                return error_response(
                    405,
                    f"{request.method} is not allowed on {request.path}; use {' or '.join(sorted(methods))}.",
                    headers={"Allow": allow_header},
                )
            try:
                if not public:
                    auth.authenticate(request)
                    if permission and not request.user.has_perm(permission):
                        raise ApiError(
                            403,
                            f"{request.user.get_username()} lacks the '{permission}' permission; "
                            "ask an administrator to grant it.",
                        )
                return view(request, *args, **kwargs)
            except ApiError as error:
                return error.response()
            except operations.OperationDenied as error:
                return error_response(403, str(error))
            except RequestDataTooBig:
                return error_response(
                    413,
                    "The request body is too large; send a smaller JSON body.",
                    field="body",
                )
            except (OperationalError, InterfaceError) as error:
                logger.warning(
                    "API %s %s: database unavailable: %s", request.method, request.path, error
                )
                return error_response(
                    503,
                    "The database is unavailable or busy; retry in a few seconds.",
                    headers={"Retry-After": "5"},
                )
            except redis.RedisError as error:
                logger.warning(
                    "API %s %s: Redis unavailable: %s", request.method, request.path, error
                )
                return error_response(
                    503,
                    "Redis is unavailable; retry in a few seconds (manage.py doctor says why).",
                    headers={"Retry-After": "5"},
                )
            except Exception:
                # Logged and signalled as Django does for any view (the test client re-raises
                # it), but the caller still gets JSON rather than an HTML error page.
                logger.exception("API %s %s failed", request.method, request.path)
                got_request_exception.send(sender=None, request=request)
                return error_response(
                    500, "Keel failed to handle this request; the error is in the server log."
                )

        wrapper.api_methods = tuple(sorted(methods))
        return wrapper

    return decorator
