"""Each test run claims a Redis database of its own (tests/isolation.py)."""

import pytest
import redis

from bench.fault_stores import ThrowawayRedis
from tests import isolation


@pytest.fixture
def server(tmp_path):
    server = ThrowawayRedis(tmp_path / "redis")
    yield server
    server.stop()


def at(server, number: int) -> redis.Redis:
    return redis.Redis.from_url(server.url.rsplit("/", 1)[0] + f"/{number}")


def test_a_run_takes_the_asked_database_when_it_is_free(server):
    url = server.url.rsplit("/", 1)[0] + "/5"
    assert isolation.claim_database(url) == url
    assert at(server, 5).exists(isolation.CLAIM_KEY, isolation.MARK_KEY) == 2


def test_a_second_run_takes_another_database(server):
    url = server.url.rsplit("/", 1)[0] + "/5"
    first = isolation.claim_database(url)
    second = isolation.claim_database(url)
    assert first != second


def test_someone_elses_keys_are_never_touched_but_test_leftovers_are_reused(server):
    base = server.url.rsplit("/", 1)[0]
    at(server, 5).set("their:key", "theirs")
    assert isolation.claim_database(f"{base}/5") != f"{base}/5"
    assert at(server, 5).get("their:key") == b"theirs"

    leftovers = at(server, 6)
    leftovers.set(isolation.MARK_KEY, "1")
    leftovers.set("rq:job:keel-1-1", "from a run that crashed")
    assert isolation.claim_database(f"{base}/6") == f"{base}/6"
