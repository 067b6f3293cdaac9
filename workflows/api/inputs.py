"""Request fields, declared once: validated here and documented by openapi.py.

A ``Field`` knows its JSON type and bounds; ``clean`` returns the value or raises a 400
naming the field. Bodies are JSON objects; an unknown key is an error (a typo such as
``reson`` must not be silently ignored), unknown query parameters are ignored.
"""

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import UnreadablePostError

from workflows.api.errors import ApiError, invalid
from workflows.models import Run

MAX_ID = 2**63 - 1  # a BigAutoField; larger ids would overflow the database's integer


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # string, integer, number, boolean, object, any, status-list
    description: str
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    enum: tuple[str, ...] | None = None
    pattern: str | None = None  # documented; ``must_have_text`` enforces the one we use
    must_have_text: bool = False

    def clean(self, value):
        check = getattr(self, f"_clean_{self.kind.replace('-', '_')}")
        return check(value)

    def _clean_string(self, value):
        if not isinstance(value, str):
            raise invalid(self.name, f"must be a string, not {_json_type(value)}.")
        check_text(self.name, value)
        if self.must_have_text and not value.strip():
            raise invalid(self.name, "must not be empty; say why, it is kept in the run's history.")
        if self.min_length is not None and len(value) < self.min_length:
            raise invalid(self.name, f"must be at least {self.min_length} character(s).")
        if self.max_length is not None and len(value) > self.max_length:
            raise invalid(self.name, f"must be at most {self.max_length} characters.")
        if self.enum and value not in self.enum:
            raise invalid(self.name, f"must be one of {', '.join(self.enum)} (got {value!r}).")
        return value.strip() if self.must_have_text else value

    def _clean_integer(self, value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(self.name, f"must be a whole number, not {_json_type(value)}.")
        return self._in_bounds(value)

    def _clean_number(self, value):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise invalid(self.name, f"must be a number, not {_json_type(value)}.")
        return self._in_bounds(value)

    def _clean_boolean(self, value):
        if not isinstance(value, bool):
            raise invalid(self.name, f"must be true or false, not {_json_type(value)}.")
        return value

    def _clean_object(self, value):
        if not isinstance(value, dict):
            raise invalid(self.name, f"must be a JSON object, not {_json_type(value)}.")
        return check_text(self.name, value)

    def _clean_any(self, value):
        return check_text(self.name, value)

    def _in_bounds(self, value):
        if self.minimum is not None and value < self.minimum:
            raise invalid(self.name, f"must be at least {self.minimum:g} (got {value:g}).")
        if self.maximum is not None and value > self.maximum:
            raise invalid(self.name, f"must be at most {self.maximum:g} (got {value:g}).")
        return value


def check_text(name: str, value):
    """Refuse text the database cannot store: NUL characters and unpaired surrogates
    (valid JSON escapes, but PostgreSQL rejects both). Walks nested JSON values."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise invalid(name, "must not contain NUL (\\u0000) characters.")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid(
                    name, "must be valid Unicode (it has an unpaired surrogate)."
                ) from None
    return value


def _json_type(value) -> str:
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


# --- Bodies -----------------------------------------------------------------------------------

REASON = Field(
    "reason",
    "string",
    "Why you do this; kept with your name in the run's history. Required (optional with dry_run).",
    required=True,
    min_length=1,
    max_length=2000,
    pattern=r"\S",
    must_have_text=True,
)
MAX_WAIT_SECONDS = 180
DEFAULT_WAIT_SECONDS = 10

BODIES: dict[str, tuple[Field, ...]] = {
    "start": (
        Field("params", "object", "Run parameters declared by the definition.", default={}),
        Field(
            "priority",
            "string",
            "Queue priority of the run's nodes (a node's own priority wins).",
            default="default",
            enum=tuple(Run.Priority.values),
        ),
        Field(
            "wait",
            "number",
            f"Seconds to wait for the run to finish before answering (at most "
            f"{MAX_WAIT_SECONDS}, and never longer than the workflow's own timeout).",
            default=DEFAULT_WAIT_SECONDS,
            minimum=0,
            maximum=MAX_WAIT_SECONDS,
        ),
    ),
    "resume": (REASON,),
    "cancel": (REASON,),
    "rollback": (
        REASON,
        Field(
            "to_checkpoint",
            "integer",
            "Roll back to this checkpoint (an id from GET /runs/{run_id}/checkpoints). "
            "Give exactly one of to_checkpoint and to_node.",
            minimum=1,
            maximum=MAX_ID,
        ),
        Field(
            "to_node",
            "string",
            "Roll back to just before this node ran.",
            min_length=1,
            max_length=100,
        ),
        Field(
            "resume",
            "boolean",
            "Resume the run afterwards; false leaves it cancelled until you resume it.",
            default=True,
        ),
    ),
    "retry": (
        REASON,
        Field("downstream", "boolean", "Also reset every node downstream of it.", default=False),
        Field(
            "expected_attempt",
            "integer",
            "The attempt number you saw; if the node has moved on since, nothing changes.",
            minimum=0,
            maximum=MAX_ID,
        ),
    ),
    "skip": (REASON,),
    "mark_succeeded": (
        REASON,
        Field(
            "output",
            "any",
            "The node's output as downstream nodes will see it (any JSON; default {}). "
            f"At most {settings.KEEL_MAX_OUTPUT_BYTES} bytes as JSON.",
        ),
    ),
}


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(request, fields: tuple[Field, ...], *, reason_optional: bool = False) -> dict:
    """The JSON object body, checked against ``fields``; defaults filled in."""
    try:
        raw = request.body
    except UnreadablePostError:
        raise invalid("body", "could not be read; send it again.") from None
    if raw.strip():
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as error:
            raise invalid("body", f"is not valid JSON ({error}).") from None
        except RecursionError:
            raise invalid("body", "is nested too deeply.") from None
    else:
        data = {}
    if not isinstance(data, dict):
        raise invalid("body", f"must be a JSON object, not {_json_type(data)}.")
    known = {field.name: field for field in fields}
    unknown = sorted(set(data) - set(known))
    if unknown:
        accepted = ", ".join(known) or "no fields"
        raise invalid(unknown[0], f"is not a field of this request (it accepts: {accepted}).")
    cleaned = {}
    for field in fields:
        if field.name in data:
            cleaned[field.name] = field.clean(data[field.name])
        elif field.required and not (reason_optional and field is REASON):
            raise invalid(field.name, "is required.")
        elif field.default is not None:
            cleaned[field.name] = copy.deepcopy(field.default)
    return cleaned


# --- Query parameters -------------------------------------------------------------------------


def limit_field(default: int, maximum: int) -> Field:
    return Field(
        "limit",
        "integer",
        "How many results per page.",
        default=default,
        minimum=1,
        maximum=maximum,
    )


AFTER = Field(
    "after",
    "integer",
    "Return results after this one (the next link sets it).",
    minimum=0,
    maximum=MAX_ID,
)
DRY_RUN = Field(
    "dry_run",
    "boolean",
    "Answer with the preview of what the action would do, and change nothing.",
    default=False,
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def query(request, field: Field):
    """A query parameter's value, converted to the field's kind; None when absent."""
    raw = request.GET.get(field.name)
    if raw is None:
        return field.default
    if field.kind == "boolean":
        value = raw.strip().lower()
        if value in _TRUE | _FALSE:
            return value in _TRUE
        raise invalid(field.name, f"must be true or false (or 1/0), not {raw!r}.")
    if field.kind == "integer":
        try:
            value = int(raw)
        except ValueError:
            raise invalid(field.name, f"must be a whole number, not {raw!r}.") from None
        return field._in_bounds(value)
    if field.kind == "status-list":
        values = [part.strip() for part in raw.split(",") if part.strip()]
        bad = [value for value in values if value not in (field.enum or ())]
        if bad or not values:
            raise invalid(
                field.name,
                f"must be one or more of {', '.join(field.enum or ())}, comma-separated "
                f"(got {raw!r}).",
            )
        return values
    return field.clean(raw)


IDEMPOTENCY_KEY_MAX = 64


def idempotency_key(request, user) -> str | None:
    """The ``Idempotency-Key`` header, scoped to the user: a repeat changes nothing."""
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
    return f"api:{user.pk}:{key}"


# --- Query parameters of each list ------------------------------------------------------------

WORKFLOW_FILTER = Field(
    "workflow", "string", "Only runs of this workflow (its slug).", min_length=1, max_length=100
)
STATUS_FILTER = Field(
    "status",
    "status-list",
    "Only runs in these states, comma-separated (e.g. failed,cancelled).",
    enum=tuple(Run.Status.values),
)
CURSOR = Field(
    "cursor",
    "string",
    "Where the page starts; copy it from the previous page's next link.",
    min_length=1,
    max_length=200,
)
AFTER_SLUG = Field(
    "after",
    "string",
    "Return workflows whose slug sorts after this one (the next link sets it).",
    min_length=1,
    max_length=100,
)
ATTEMPT = Field(
    "attempt",
    "integer",
    "Which attempt's log (default: the node's current attempt).",
    minimum=1,
    maximum=MAX_ID,
)

QUERIES: dict[str, tuple[Field, ...]] = {
    "workflows": (AFTER_SLUG, limit_field(50, 200)),
    "runs": (WORKFLOW_FILTER, STATUS_FILTER, CURSOR, limit_field(50, 200)),
    "workflow_runs": (STATUS_FILTER, CURSOR, limit_field(50, 200)),
    "events": (AFTER, limit_field(100, 500)),
    "checkpoints": (AFTER, limit_field(100, 500)),
    "attempts": (AFTER, limit_field(50, 200)),
    "logs": (ATTEMPT, AFTER, limit_field(200, 1000)),
    "action": (DRY_RUN,),
}


def queries(request, name: str) -> dict:
    """Every query parameter of list ``name``, converted; absent ones at their default."""
    return {field.name: query(request, field) for field in QUERIES[name]}
