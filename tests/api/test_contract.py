"""The API against the OpenAPI document ninja generates for it, with schemathesis.

All four phases: the examples, coverage (boundary and invalid values of each field) and
fuzzing phases run per operation; the stateful phase chains operations by the links
schemathesis infers (start a run, then read it, act on it, read its nodes...).
Requests go through the WSGI app with a real token against real rows:
run ids, node keys and slugs are often swapped for ones that exist, so that success
responses are checked too, not only 404s. Every response must be a documented status
with a documented JSON shape, and never a 5xx.

The database is transactional (real commits), because Django's WSGI handler closes a
connection that sits in an unfinished transaction at the start of each request.
"""

import copy

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config.api import api
from tests.api.conftest import work
from workflows.models import Checkpoint

SCHEMA = schemathesis.openapi.from_dict(copy.deepcopy(api.get_openapi_schema()))
SCHEMA.config.generation.update(deterministic=True, database="none")
SCHEMA.config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])
APP = WSGIHandler()
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
START_RUN = ("POST", "/api/v1/workflows/{slug}/runs")


class Rows:
    def __init__(self, token: str, run_ids: list[int], checkpoint_ids: list[int]):
        self.token = token
        self.run_ids = run_ids
        self.checkpoint_ids = checkpoint_ids
        self.node_keys = ["a", "b", "c"]
        self.slugs = ["chain"]


@pytest.fixture
def rows(operator, token_for, start_run, clean_redis) -> Rows:
    """A failed run (with a checkpoint and logs), a succeeded one and a running one."""
    from tests.api.conftest import CHAIN

    failed = start_run(CHAIN)
    work(failed, "a")
    work(failed, "b", checkpoint={"offset": 5}, fail="ValueError", logs=["one", "two"])
    succeeded = start_run(CHAIN)
    for key in "abc":
        work(succeeded, key)
    running = start_run(CHAIN)
    return Rows(
        token_for(operator),
        [failed.pk, succeeded.pk, running.pk],
        list(Checkpoint.objects.values_list("pk", flat=True)),
    )


def aim_at_real_rows(case, rows: Rows) -> None:
    """Swap most generated path parameters for existing ones (the rest stay: 404s)."""
    _swap(case.path_parameters, "run_id", int, rows.run_ids)
    _swap(case.path_parameters, "node_key", str, rows.node_keys)
    _swap(case.path_parameters, "slug", str, rows.slugs)
    if isinstance(case.body, dict):
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
    if number % 4:
        values[name] = choices[(number // 4) % len(choices)]


def never_wait(case) -> None:
    """A start request waits up to 10 s by default; no worker runs here, so ask for none."""
    if (case.method.upper(), case.operation.path) != START_RUN:
        return
    if not isinstance(case.body, dict):
        if case.body is None or type(case.body).__name__ == "NotSet":
            case.body = {"wait": 0}  # an empty body would wait the default 10 s
        return
    wait = case.body.get("wait")
    if wait is None or (isinstance(wait, int | float) and not isinstance(wait, bool)):
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
    case.call_and_validate(
        app=APP,
        headers={"Authorization": f"Bearer {rows.token}"},
        checks=CHECKS,
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sequences_of_calls_match_the_document(rows):
    class Sequences(SCHEMA.as_state_machine()):
        def before_call(self, case):
            aim_at_real_rows(case, rows)
            never_wait(case)

        def get_call_kwargs(self, case):
            return {"app": APP, "headers": {"Authorization": f"Bearer {rows.token}"}}

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
