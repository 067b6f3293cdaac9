"""The ``Idempotency-Key`` header of writes: a repeat of a request changes nothing."""

from workflows.api.errors import ApiError

IDEMPOTENCY_KEY_MAX = 64
# Documented on each write (read by hand, so a bad key is a 400 that names the header).
HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Any unique string (e.g. a UUID). Sending the same request again with the "
    "same key changes nothing and answers changed=false (or, for a start, the run the first "
    "request started).",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": IDEMPOTENCY_KEY_MAX,
        "pattern": "^[!-~]+$",
    },
}
OPENAPI = {"parameters": [HEADER]}


def request_key(request) -> str | None:
    """The header, scoped to the caller (two users' equal keys are different requests)."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not key.isprintable() or not key.isascii():
        raise ApiError(
            400,
            f"Idempotency-Key: must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters, "
            "e.g. a UUID.",
            field="Idempotency-Key",
        )
    return f"api:{request.user.pk}:{key}"
