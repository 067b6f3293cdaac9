"""Keyset pages: a page costs the same at run 100 000 as at run 10.

Each list orders by a unique key and the ``next`` link carries the last key seen
(``after``, or for runs a ``cursor`` of created_at and id), never an offset.
"""

import base64
from datetime import datetime

from workflows.api.errors import invalid
from workflows.api.schemas import MAX_ID


def page(queryset, limit: int) -> tuple[list, bool]:
    """The first ``limit`` rows and whether there are more."""
    rows = list(queryset[: limit + 1])
    return rows[:limit], len(rows) > limit


def next_url(request, **params) -> str:
    """This request's URL with ``params`` replaced: the link to the next page."""
    query = request.GET.copy()
    for name, value in params.items():
        query[name] = str(value)
    return request.build_absolute_uri(f"{request.path}?{query.urlencode()}")


def encode_cursor(run) -> str:
    raw = f"{run.created_at.isoformat()}|{run.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, pk = raw.split("|")
        when, pk = datetime.fromisoformat(created_at), int(pk)
        if when.tzinfo is None or not 0 < pk <= MAX_ID:
            raise ValueError("not a cursor")
        return when, pk
    except ValueError:
        raise invalid(
            "cursor", "is not one this API gave out; copy the next link of the previous page."
        ) from None
