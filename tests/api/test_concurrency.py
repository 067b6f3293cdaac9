"""Twenty operators click resume at the same moment: real parallel HTTP requests against
a live server (threads + urllib), each with its own database connection. The run's row
lock in operations._operate lets exactly one of them act; the others see a running run
(or an applied Idempotency-Key) and change nothing."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from workflows.models import NodeAttempt, NodeRun, Run, RunEvent

CLICKS = 20


def post_all_at_once(url: str, headers_for) -> list[tuple[int, dict]]:
    barrier = threading.Barrier(CLICKS)
    answers, failures = [], []

    def click(number: int) -> None:
        request = urllib.request.Request(
            url,
            data=json.dumps({"reason": f"click {number}"}).encode(),
            headers={"Content-Type": "application/json", **headers_for(number)},
            method="POST",
        )
        try:
            barrier.wait(timeout=30)
            with urllib.request.urlopen(request, timeout=90) as response:
                answers.append((response.status, json.load(response)))
        except urllib.error.HTTPError as error:
            answers.append((error.code, json.load(error)))
        except Exception as error:  # asserted below, with the others' answers
            failures.append(repr(error))

    threads = [threading.Thread(target=click, args=(n,)) for n in range(CLICKS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    return answers


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "same_key", [False, True], ids=["distinct-requests", "one-idempotency-key"]
)
def test_twenty_simultaneous_resume_requests_make_exactly_one_transition(
    live_server, operator, token_for, failed_chain, clean_redis, same_key
):
    token = token_for(operator)
    b = NodeRun.objects.get(run=failed_chain, node_key="b")

    def headers_for(number: int) -> dict:
        key = "resume-click" if same_key else f"resume-click-{number}"
        return {"Authorization": f"Bearer {token}", "Idempotency-Key": key}

    answers = post_all_at_once(
        f"{live_server.url}/api/v1/runs/{failed_chain.pk}/resume", headers_for
    )

    assert [status for status, _ in answers] == [200] * CLICKS, answers
    assert sum(body["changed"] for _, body in answers) == 1
    assert {body["run"]["status"] for _, body in answers} == {"running"}
    events = RunEvent.objects.filter(run=failed_chain, kind=RunEvent.Kind.OPERATOR)
    assert events.count() == 1
    assert events.get().before["run_status"] == "failed"
    assert NodeAttempt.objects.filter(node_run=b).count() == 2
    b.refresh_from_db()
    assert (b.status, b.attempt) == (NodeRun.Status.QUEUED, 2)
    assert Run.objects.get(pk=failed_chain.pk).status == Run.Status.RUNNING
