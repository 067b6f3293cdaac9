"""The top of the run page leads to the fix: where the run is, what failed and why (the
error once), the finding in plain words, one recommended action and no action twice; the
rollback picker shows each checkpoint's node, time and state."""

import re

import pytest

from tests.web.conftest import CHAIN, work
from tests.web.test_dashboard import finding, nodes
from workflows import operations

pytestmark = pytest.mark.django_db


def summary_of(page: str) -> str:
    return page[page.index('aria-label="Summary"') : page.index('class="panel graph-panel"')]


def buttons(page: str) -> list[str]:
    """The href of every action button on the page."""
    return re.findall(r'<a class="btn[^"]*" href="([^"]+)"', page)


def test_a_failed_run_says_what_failed_and_why_once(operator_client, failed_run):
    page = operator_client.get(f"/runs/{failed_run.pk}/").content.decode()
    summary = summary_of(page)

    assert "b failed on attempt 1 of 1; c never ran." in summary
    assert "<strong>Why:</strong> ValueError: bad row 501" in summary
    # The error is in the summary and in the attempt's row of the node panel (and the
    # history's record of the change); the node's reason repeats it, so the panel leaves
    # the reason out.
    before_history = page[: page.index("<h2>History")]
    assert before_history.count("bad row 501") == 3  # summary, attempt row, traceback
    assert "Traceback: bad row 501" in page
    # One recommended action, the resume; rollback beside it; nothing twice on the page.
    assert re.search(
        rf'class="btn primary" href="/runs/{failed_run.pk}/resume/preview/" title="Recommended"',
        summary,
    )
    assert f"/runs/{failed_run.pk}/rollback/preview/" in summary
    assert len(buttons(page)) == len(set(buttons(page))), buttons(page)


def test_the_node_panel_keeps_the_reason_when_no_attempt_carries_the_error(
    operator_client, failed_run
):
    page = operator_client.get(f"/runs/{failed_run.pk}/?node=c").content.decode()
    panel = page[page.index('id="node"') :]
    assert 'class="reason-box' in panel and "b failed" in panel


def test_a_running_run_with_a_finding_leads_with_it(operator_client, start_run):
    run = start_run(CHAIN)
    stuck = finding(run, nodes(run)["a"], title="Node a has no heartbeat")
    stuck.evidence = {
        "node": "a",
        "seconds_since_heartbeat": 95,
        "heartbeat_at": stuck.first_seen.isoformat(),
    }
    stuck.action = {"kind": "retry_node", "run": run.pk, "node": "a"}
    stuck.save()

    page = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    summary = summary_of(page)

    assert "Running, 0 of 3 nodes done, but: Node a has no heartbeat." in summary
    evidence = summary[summary.index('<table class="evidence"') :]
    assert re.search(r"<th scope=\"row\">since heartbeat</th><td>1 min 35s</td>", evidence)
    assert re.search(r"<th scope=\"row\">last heartbeat</th><td>[\d-]+ [\d:]+ UTC <span", evidence)
    assert "data-ago>30s ago</time>" in evidence
    retry = f"/runs/{run.pk}/retry/preview/?node=a"
    assert f'class="btn primary" href="{retry}"' in summary
    # The node panel offers no second retry, nor the finding again.
    assert buttons(page).count(retry) == 1
    assert page.count("Node a has no heartbeat") == 1
    assert f"/runs/{run.pk}/cancel/preview/" in summary


def test_a_succeeded_run_has_nothing_to_recommend(operator_client, succeeded_run):
    summary = summary_of(operator_client.get(f"/runs/{succeeded_run.pk}/").content.decode())
    assert re.search(r"Succeeded in \d+s: all 3 nodes done\.", summary)
    assert 'title="Recommended"' not in summary
    assert f"/runs/{succeeded_run.pk}/rollback/preview/" in summary
    assert "Why:" not in summary


def test_times_carry_their_moment_for_the_page_to_keep_them_true(operator_client, failed_run):
    page = operator_client.get(f"/runs/{failed_run.pk}/").content.decode()
    finished = failed_run.finished_at.isoformat()
    assert f'<time datetime="{finished}"' in page and "data-ago" in page
    assert re.search(r"<body [^>]*data-now=\"\d{4}-\d\d-\d\dT", page)
    assert '<script src="/static/times.js" defer></script>' in page


def test_the_rollback_picker_groups_checkpoints_by_node_with_their_state(
    operator_client, start_run
):
    run = start_run(CHAIN)
    work(run, "a", checkpoint={"offset": 100, "file": "orders.csv", "rows": [1, 2, 3]})
    node_b = nodes(run)["b"]
    work(run, "b", checkpoint={"offset": 7}, fail="ValueError")
    operations.retry_node(run.pk, "b", actor="test", reason="again")
    work(run, "b", checkpoint={"offset": 9}, fail="ValueError")

    page = operator_client.get(f"/runs/{run.pk}/rollback/preview/").content.decode()
    picker = page[
        page.index('<table class="checkpoint-picker">') : page.index("Just before a node")
    ]

    # a first (the order nodes run in), its progress checkpoint and the engine's node-done
    # one; b's newest checkpoint first, the earlier folded under it.
    assert picker.index("<code>a</code>") < picker.index("<code>b</code>")
    assert "file orders.csv · offset 100 · rows [3 items]" in picker
    assert "offset 9" in picker and "attempt 2" in picker
    assert "1 earlier checkpoint of <code>b</code>" in picker
    folded = picker[picker.index("1 earlier checkpoint of <code>b</code>") :]
    assert "offset 7" in folded and "attempt 1" in folded
    assert (
        picker.count("?to_checkpoint=")
        == node_b.checkpoints.count() + nodes(run)["a"].checkpoints.count()
    )


def test_a_running_node_can_be_stopped_from_its_panel(operator_client, start_run):
    from workflows import engine

    run = start_run(CHAIN)
    a = nodes(run)["a"]
    engine.claim_attempt(a.pk, a.attempt, worker="w-1", pid=4242, host="host-1")
    stop = f"/runs/{run.pk}/stop-node/preview/?node=a"
    assert stop in buttons(operator_client.get(f"/runs/{run.pk}/?node=a").content.decode())
    preview = operator_client.get(stop).content.decode()
    assert "Stop a running node" in preview and 'name="expected_attempt" value="1"' in preview
    assert stop not in operator_client.get(f"/runs/{run.pk}/?node=b").content.decode()
