"""The API against the OpenAPI document it serves (/api/v1/openapi.json), with schemathesis.

All four phases: the examples, coverage (boundary and invalid values of each field) and
fuzzing phases run per operation; the stateful phase chains operations by the links
schemathesis infers (start a run, then read it, act on it, read its nodes...).
Requests go through the WSGI app with a real token against real rows (runs in each
state, findings, a queue permission): run ids, node keys and slugs are often swapped for
ones that exist, so that success responses are checked too, not only 404s. Every response
must be a documented status with a documented JSON shape, and never a 5xx; input the
document calls invalid must be refused; without the token an operation must refuse; a
method the path does not take is a 405 with Allow.

Hypothesis replays the choices of one sequence in the next, so a sequence must meet the
same rows with the same ids as the one before: each starts from emptied run tables with
their id sequences reset (otherwise actions of one sequence change the status codes, and
so the links, of the next, and Hypothesis stops with "inconsistent data generation").

The database is transactional (real commits), because Django's WSGI handler closes a
connection that sits in an unfinished transaction at the start of each request.
"""

from collections.abc import Iterator

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission
from django.core.handlers.wsgi import WSGIHandler
from django.core.management.color import no_style
from django.db import connection
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from diagnostics.models import Finding
from tests.api.conftest import CHAIN, work
from workflows.api.schemas import MAX_WAIT_SECONDS as MAX_WAIT
from workflows.models import (
    AuditEvent,
    Checkpoint,
    Deployment,
    LogLine,
    NodeAttempt,
    NodeRun,
    Run,
    RunEvent,
)

APP = WSGIHandler()
SCHEMA = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", APP)
SCHEMA.config.generation.update(deterministic=True, database="none")
SCHEMA.config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    missing_required_header,
    ignored_auth,
    unsupported_method,
    allow_header_conformance,
]
# The token of the test that runs; the fixture ``rows`` sets it.
TOKEN: dict[str, str] = {}
START_RUN = ("POST", "/api/v1/workflows/{slug}/runs")
# Every table that holds a run or refers to one (and the queue actions' audit trail).
RUN_TABLES = [
    model._meta.db_table
    for model in (
        LogLine,
        NodeAttempt,
        Checkpoint,
        RunEvent,
        Finding,
        NodeRun,
        Run,
        Deployment,  # a validation run's deployment refers to it
        AuditEvent,
    )
]


@SCHEMA.auth(refresh_interval=None)
class BearerToken:
    """The test's token, given as schemathesis auth (not as a header) so that the
    ignored_auth check knows it is real and probes the operation without it."""

    def get(self, case, ctx):
        return TOKEN.get("value", "keel_none-yet")  # asked once while collecting

    def set(self, case, data, ctx):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


class Rows:
    def __init__(self, token: str, start_run):
        self.token = token
        self.start_run = start_run
        self.node_keys = ["a", "b", "c"]
        self.slugs = ["chain"]
        self.make()

    def make(self) -> None:
        """A failed run (with a checkpoint and logs), a succeeded one and a running one;
        an open finding about the failed run and a resolved one about a queue."""
        failed = self.start_run(CHAIN)
        work(failed, "a")
        work(failed, "b", checkpoint={"offset": 5}, fail="ValueError", logs=["one", "two"])
        succeeded = self.start_run(CHAIN)
        for key in "abc":
            work(succeeded, key)
        running = self.start_run(CHAIN)
        now = timezone.now()
        blocked = NodeRun.objects.get(run=failed, node_key="c")
        Finding.objects.create(
            code="blocked_upstream",
            subject=f"node_run:{blocked.pk}",
            run=failed,
            node_run=blocked,
            title="c waits for b, which failed",
            evidence={"upstream": "b"},
            suggestion="Retry or skip b.",
            action={"kind": "retry", "run": failed.pk, "node": "b"},
            first_seen=now,
            last_seen=now,
        )
        Finding.objects.create(
            code="backlog",
            subject="queue:default",
            queue="default",
            title="default had 120 jobs waiting",
            suggestion="Add workers.",
            first_seen=now,
            last_seen=now,
            resolved_at=now,
        )
        self.run_ids = [failed.pk, succeeded.pk, running.pk]
        self.checkpoint_ids = list(Checkpoint.objects.values_list("pk", flat=True))
        self.deployment_ids = list(Deployment.objects.values_list("pk", flat=True))

    def remake(self) -> None:
        """The same rows again, with the same ids: empty the run tables, reset their ids."""
        flush = connection.ops.sql_flush(no_style(), RUN_TABLES, reset_sequences=True)
        connection.ops.execute_sql_flush(flush)
        self.make()


@pytest.fixture
def rows(operator, token_for, start_run, clean_redis) -> Iterator[Rows]:
    operator.user_permissions.add(Permission.objects.get(codename="operate_queues"))
    rows = Rows(token_for(operator), start_run)
    TOKEN["value"] = rows.token
    yield rows
    TOKEN.clear()


def aim_at_real_rows(case, rows: Rows) -> None:
    """Swap most generated path parameters for existing ones (the rest stay: 404s)."""
    _swap(case.path_parameters, "run_id", int, rows.run_ids)
    _swap(case.path_parameters, "node_key", str, rows.node_keys)
    _swap(case.path_parameters, "slug", str, rows.slugs)
    _swap(case.path_parameters, "deployment_id", int, rows.deployment_ids)
    _swap(case.query, "version", int, [1])
    if isinstance(case.body, dict):
        _swap(case.body, "version", int, [1])
        _swap(case.body, "to_node", str, rows.node_keys)
        _swap(case.body, "to_checkpoint", int, rows.checkpoint_ids)


def _swap(values, name: str, kind: type, choices: list) -> None:
    """Replace ``values[name]`` by one of ``choices`` three times out of four, when it is a
    well-formed value; malformed ones are left for the API to refuse."""
    value = (values or {}).get(name)
    if kind is int and isinstance(value, str) and value.isdigit():
        value = int(value)  # the coverage phase passes path parameters already as text
    if not isinstance(value, kind) or isinstance(value, bool):
        return
    number = value if isinstance(value, int) else len(value)
    if number % 4 and choices:
        values[name] = choices[(number // 4) % len(choices)]


def never_wait(case) -> None:
    """A start request waits up to 10 s by default; no worker runs here, so ask for none."""
    if (case.method.upper(), case.operation.path) != START_RUN:
        return
    if not isinstance(case.body, dict):
        if case.body is None or type(case.body).__name__ == "NotSet":
            case.body = {"wait": 0}  # an empty body would wait the default 10 s
        return
    # Only a missing or valid wait: an invalid one (null, 181, "10") must stay, to be refused.
    wait = case.body.get("wait", 0)
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= MAX_WAIT:
        case.body["wait"] = 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@SCHEMA.parametrize()
def test_the_api_matches_its_openapi_document(case, rows):
    aim_at_real_rows(case, rows)
    never_wait(case)
    case.call_and_validate(app=APP, checks=CHECKS)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sequences_of_calls_match_the_document(rows):
    class Sequences(SCHEMA.as_state_machine()):
        def setup(self):
            rows.remake()

        def before_call(self, case):
            aim_at_real_rows(case, rows)
            never_wait(case)

        def get_call_kwargs(self, case):
            return {"app": APP}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS)

    Sequences.run(
        settings=settings(
            max_examples=40,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )


WRITES = [path for path, operations in SCHEMA.raw_schema["paths"].items() if "post" in operations]


@pytest.mark.django_db
@pytest.mark.parametrize("template", WRITES)
def test_a_body_over_the_size_limit_is_a_documented_413(
    client, operator, token_for, failed_chain, template
):
    """A body Django refuses to read (DATA_UPLOAD_MAX_MEMORY_SIZE) is an answer the
    document lists for every write, in the usual error shape."""
    operator.user_permissions.add(Permission.objects.get(codename="operate_queues"))
    path = template.format(
        run_id=failed_chain.pk,
        node_key="b",
        slug="chain",
        name="default",
        deployment_id=1,
        version=1,
    )
    body = '{"reason": "' + "x" * django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE + '"}'

    response = client.post(
        path,
        body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {token_for(operator)}"},
    )

    assert response.status_code == 413
    assert response.json()["error"]["field"] == "body"
    assert "413" in SCHEMA.raw_schema["paths"][template]["post"]["responses"]
