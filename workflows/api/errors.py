"""API errors: always JSON, ``{"error": {"code": ..., "message": ..., "field": ...}}``.

The message says what to fix; ``field`` (present for bad input) names the field.
``from_validation`` turns pydantic's errors into the same shape, in the same words.
"""

import re

from django.http import JsonResponse

API_ERROR_STATUSES = {
    400: "invalid",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    500: "server_error",
    503: "unavailable",
}
# Where ninja says a value came from; the first part of an error's location.
_SOURCES = {"body", "query", "path", "header", "cookie", "form", "file"}


class ApiError(Exception):
    """Raised anywhere below a view; the exception handler turns it into a JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or API_ERROR_STATUSES[status]
        self.field = field
        self.headers = headers or {}

    def response(self) -> JsonResponse:
        return error_response(
            self.status, self.message, code=self.code, field=self.field, headers=self.headers
        )


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    headers: dict | None = None,
) -> JsonResponse:
    error = {"code": code or API_ERROR_STATUSES[status], "message": message}
    if field:
        error["field"] = field
    response = JsonResponse({"error": error}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def invalid(field: str, message: str) -> ApiError:
    """A 400 for one bad input field; the message starts with the field's name."""
    return ApiError(400, f"{field}: {message}", field=field)


def from_validation(errors: list[dict], *, body_params: tuple[str, ...] = ()) -> ApiError:
    """The first of pydantic's (or ninja's) validation errors, as a 400 naming the field.

    A location is ``(source, [ninja's body parameter,] field, ...)``; the field is the
    first part that is neither, and ``body`` when the whole body is at fault.
    """
    error = errors[0]
    parts = [part for part in error.get("loc", ()) if isinstance(part, str)]
    if parts and parts[0] in _SOURCES:
        source = parts.pop(0)
        if source == "body" and parts and parts[0] in body_params:
            parts.pop(0)
    return invalid(parts[0] if parts else "body", _describe(error))


def _describe(error: dict) -> str:
    kind, ctx, value = error.get("type", ""), error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "is required."
    if kind == "extra_forbidden":
        return "is not a field of this request (see its schema at /api/v1/openapi.json)."
    if kind in ("string_type", "string_sub_type"):
        return f"must be a string, not {json_type(value)}."
    if kind.startswith("int_"):
        return f"must be a whole number, not {_shown(value)}."
    if kind.startswith("float_") or kind == "finite_number":
        return f"must be a number, not {_shown(value)}."
    if kind.startswith("bool_"):
        return f"must be true or false (or 1/0), not {_shown(value)}."
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a JSON object, not {json_type(value)}."
    if kind == "list_type":
        return f"must be an array, not {json_type(value)}."
    bounds = {
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key):g} (got {value!r})."
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters."
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length')} character(s)."
    if kind in ("literal_error", "enum"):
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"must be one of {', '.join(expected)} (got {value!r})."
    message = str(error.get("msg", "is not valid."))
    return message.removeprefix("Value error, ")


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else json_type(value)


def json_type(value) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)
