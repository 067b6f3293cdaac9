"""Keel's JSON API, mounted at /api/v1/: one NinjaAPI with the routers of both apps.

It lives here, not in an app, because it reads both workflows and diagnostics (and
workflows never imports diagnostics). Around ninja's URL patterns it adds what Keel's API
has always done: a JSON 405 with ``Allow``, ``OPTIONS`` and ``HEAD``, and a JSON 404
for any other path under /api/v1/. The OpenAPI document is at /api/v1/openapi.json.
"""

import logging
from functools import wraps

import redis
from django.core.exceptions import RequestDataTooBig
from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpResponse, HttpResponseNotAllowed
from django.urls import Resolver404, URLPattern, path, re_path, resolve
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from diagnostics.api import router as diagnostics_router
from workflows import engine, operations
from workflows.api import actions, auth, deployments, runs, workflows
from workflows.api.errors import API_ERROR_STATUSES, ApiError, error_response, from_validation
from workflows.api.parser import parser
from workflows.definitions.loading import DefinitionError

logger = logging.getLogger("workflows.api")


api = NinjaAPI(
    title="Keel API",
    version="1.0.0",
    description="Runs, their nodes, attempts and logs; operator actions; deployments of "
    "versions; findings and queues. "
    'Errors are {"error": {"code", "message", "field"}}. See docs/api.md.',
    urls_namespace="api",
    docs_url=None,  # the page would load Swagger UI from a CDN; the document is enough
    auth=[auth.BearerAuth(), auth.SessionAuth()],
    parser=parser,
)
api.add_router("", workflows.router)
api.add_router("", runs.router)
api.add_router("", actions.router)
api.add_router("", deployments.router)
api.add_router("", diagnostics_router)


# --- Exception handlers: every failure is {"error": {...}} ------------------------------------


@api.exception_handler(ApiError)
def _api_error(request, error: ApiError):
    return error.response()


@api.exception_handler(AuthenticationError)
def _not_authenticated(request, error):
    return auth.not_authenticated().response()


@api.exception_handler(HttpError)
def _http_error(request, error: HttpError):
    if isinstance(error.__cause__, ApiError):  # raised by the parser, wrapped by ninja
        return error.__cause__.response()
    code = API_ERROR_STATUSES.get(error.status_code, "invalid")
    return error_response(error.status_code, str(error), code=code)


@api.exception_handler(ValidationError)
def _invalid(request, error: ValidationError):
    return from_validation(error.errors, body_params=("body",)).response()


@api.exception_handler(operations.OperationDenied)
def _denied(request, error):
    return error_response(403, str(error))


@api.exception_handler(operations.OperationError)
def _refused(request, error):
    return error_response(409, str(error))


@api.exception_handler(engine.RunParamsError)
def _bad_params(request, error):
    return error_response(400, str(error), field="params")


@api.exception_handler(DefinitionError)
def _bad_definition(request, error):
    return error_response(400, str(error), field="definition")


@api.exception_handler(Http404)
def _not_found(request, error):
    return error_response(404, str(error) or "Not found.")


@api.exception_handler(RequestDataTooBig)
def _too_large(request, error):
    return error_response(
        413, "The request body is too large; send a smaller JSON body.", field="body"
    )


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def _database_down(request, error):
    logger.warning("API %s %s: database unavailable: %s", request.method, request.path, error)
    return error_response(
        503,
        "The database is unavailable or busy; retry in a few seconds.",
        headers={"Retry-After": "5"},
    )


@api.exception_handler(redis.RedisError)
def _redis_down(request, error):
    logger.warning("API %s %s: Redis unavailable: %s", request.method, request.path, error)
    return error_response(
        503,
        "Redis is unavailable; retry in a few seconds (manage.py doctor says why).",
        headers={"Retry-After": "5"},
    )


@api.exception_handler(Exception)
def _failed(request, error):
    # Logged and signalled as Django does for any view (the test client re-raises it),
    # but the caller still gets JSON rather than an HTML error page.
    logger.exception("API %s %s failed", request.method, request.path)
    got_request_exception.send(sender=None, request=request)
    return error_response(
        500, "Keel failed to handle this request; the error is in the server log."
    )


# --- URLs -------------------------------------------------------------------------------------


def _methods(view):
    """JSON 405 with Allow, OPTIONS (204 with Allow) and HEAD (a GET without its body)."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        method = request.method
        if method == "HEAD":
            request.method = "GET"
        response = view(request, *args, **kwargs)
        if not isinstance(response, HttpResponseNotAllowed):
            if method == "HEAD":
                request.method = "HEAD"
                response.content = b""
            return response
        allowed = {m.strip() for m in response["Allow"].split(",")} | {"OPTIONS"}
        if "GET" in allowed:
            allowed.add("HEAD")
        allow = ", ".join(sorted(allowed))
        if method == "OPTIONS":
            answer = HttpResponse(status=204)
            answer["Allow"] = allow
            return answer
        usable = " or ".join(sorted(allowed - {"HEAD", "OPTIONS"}))
        return error_response(
            405,
            f"{method} is not allowed on {request.path}; use {usable}.",
            headers={"Allow": allow},
        )

    wrapper.csrf_exempt = True
    return wrapper


def not_found(request, path=""):
    """Anything else under /api/v1/: a JSON 404 that points at the document."""
    hint = ""
    if request.path.endswith("/") and request.path.rstrip("/") != "/api/v1":
        try:
            match = resolve(request.path.rstrip("/"))
        except Resolver404:
            match = None
        if match is not None and match.func is not not_found:
            hint = f" (did you mean {request.path.rstrip('/')}? API paths have no trailing slash)"
    return error_response(
        404,
        f"No API endpoint at {request.path}{hint}. The endpoints are listed at /api/v1/openapi.json.",
    )


not_found.csrf_exempt = True


def _patterns() -> list:
    patterns, _, _ = api.urls
    wrapped = [
        URLPattern(p.pattern, _methods(p.callback), p.default_args, p.name)
        for p in patterns
        if p.name != "api-root"  # ninja's home page; ours is the 404 below
    ]
    # [\s\S], not ".": a path may hold a newline (%0A), and it is still an API path.
    anything = re_path(r"^(?P<path>[\s\S]*)$", not_found)
    return [*wrapped, path("", not_found, name="api-root"), anything]


urls = (_patterns(), "ninja", "api")
