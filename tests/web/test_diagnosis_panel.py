"""The run page and its node panel carry the watchdog's diagnosis: cause, evidence, action."""

import pytest

from diagnostics import watchdog
from diagnostics.models import Finding
from tests.operations.test_operations import work

pytestmark = pytest.mark.django_db(transaction=True)


def test_run_page_shows_the_diagnosis_with_evidence_and_a_one_click_action(
    operator_client, start_run, clean_redis
):
    run = start_run(
        {
            "name": "Diagnosed",
            "nodes": {
                "extract": {"type": "test.effect"},
                "load": {"type": "test.effect", "after": ["extract"]},
                "other": {"type": "test.effect"},
            },
        }
    )
    work(run, "extract", fail="ValueError")  # "load" is now blocked behind a failed upstream
    watchdog.tick()
    finding = Finding.objects.get(run=run, code="blocked_upstream", resolved_at__isnull=True)

    page = operator_client.get(f"/runs/{run.pk}/?node=load").content.decode()

    summary = page[page.index('aria-label="Summary"') : page.index('class="panel graph-panel"')]
    assert finding.title in summary and finding.suggestion in summary
    assert '<table class="evidence"' in summary and "failed upstream" in summary
    # The finding's one-click fix is the recommended action; the node panel shows the
    # finding no second time.
    assert f'class="btn primary" href="/runs/{run.pk}/retry/preview/?node=extract"' in summary
    assert page.count(finding.suggestion) == 1
