"""API errors: always JSON, ``{"error": {"code": ..., "message": ..., "field": ...}}``.

The message says what to fix; ``field`` (present for bad input) names the field.
"""

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


class ApiError(Exception):
    """Raised anywhere below a view; the decorator turns it into a JSON error response."""

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
