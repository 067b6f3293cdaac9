"""Schemas of the log search (GET /api/v1/logs and /logs/counts): its query parameters
and answers. Kept apart from schemas.py, whose helpers they use."""

from datetime import datetime

from django.urls import reverse
from django.utils import timezone
from ninja import Field, Schema
from pydantic import field_validator
from pydantic_core import PydanticCustomError

from workflows.api.schemas import MAX_ID, SLUG, _limit, check_text, node_url
from workflows.log_search import LEVELS


class LogSearchQuery(Schema):
    q: str | None = Field(
        None, max_length=200, description="Lines whose message contains this (any case)."
    )
    level: str | None = Field(
        None,
        max_length=10,
        description="Lines at this level or above: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
    )
    workflow: str | None = Field(None, pattern=SLUG, description="Only this workflow's runs.")
    node: str | None = Field(None, max_length=100, description="Only nodes with this key.")
    run: int | None = Field(None, ge=1, le=MAX_ID, description="Only this run.")
    since: datetime | None = Field(
        None,
        description="From this moment (ISO 8601; without an offset, in the server's time "
        "zone). Default: 24 hours ago.",
    )
    until: datetime | None = Field(None, description="Before this moment. Default: now.")

    _q_text = field_validator("q", "node")(classmethod(lambda cls, value: check_text(value)))

    @field_validator("level")
    @classmethod
    def _level(cls, value):
        if value is None:
            return None
        if value.upper() not in LEVELS:
            raise PydanticCustomError(
                "level",
                "must be one of {levels} (got {got}).",
                {"levels": ", ".join(LEVELS), "got": repr(value)},
            )
        return value.upper()

    @field_validator("since", "until")
    @classmethod
    def _aware(cls, value):
        if value is not None and timezone.is_naive(value):
            return timezone.make_aware(value)
        return value


class LogSearchPageQuery(LogSearchQuery):
    cursor: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Where the page starts; copy it from the previous page's next link.",
    )
    limit: int = _limit(100, 500)


class FoundLogLine(Schema):
    """A line found by the log search, with where it comes from."""

    id: int
    at: datetime
    level: str
    message: str
    seq: int = Field(description="Its number in the attempt's log.")
    run: int
    workflow: str = Field(description="The workflow's slug.")
    node: str
    attempt: int
    logs_url: str = Field(description="The attempt's whole log (GET, paged).")
    web_url: str = Field(description="The run page, with the node and attempt open.")

    @staticmethod
    def resolve_run(line) -> int:
        return line.attempt.node_run.run_id

    @staticmethod
    def resolve_workflow(line) -> str:
        return line.attempt.node_run.run.workflow.slug

    @staticmethod
    def resolve_node(line) -> str:
        return line.attempt.node_run.node_key

    @staticmethod
    def resolve_attempt(line) -> int:
        return line.attempt.number

    @staticmethod
    def resolve_logs_url(line, context) -> str:
        node = line.attempt.node_run
        url = node_url(context["request"], "node-logs", node.run_id, node.node_key)
        return f"{url}?attempt={line.attempt.number}"

    @staticmethod
    def resolve_web_url(line, context) -> str:
        node = line.attempt.node_run
        path = reverse("dashboard:run-detail", args=[node.run_id])
        query = f"?node={node.node_key}&attempt={line.attempt.number}#log"
        return context["request"].build_absolute_uri(path + query)


class LogSearchPage(Schema):
    since: datetime | None = Field(description="The window searched: from (inclusive)…")
    until: datetime | None = Field(description="…to (exclusive); null: until now.")
    results: list[FoundLogLine] = Field(description="Newest first.")
    next: str | None = Field(description="The next (older) page, or null on the last one.")


class LogCounts(Schema):
    since: datetime | None
    until: datetime | None
    total: int = Field(description="Matching lines, at most `cap`.")
    capped: bool = Field(description="More than `cap` lines match; counting stopped there.")
    cap: int
    by_level: dict[str, int] = Field(
        description="Matching lines by level, highest first (lower bounds when capped)."
    )
