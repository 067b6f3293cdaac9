"""Canary analysis: the statistics against reference values, and each rule of ``judge``.

The reference p-values were computed once with scipy 1.17.1 (not a project dependency):
``fisher_exact([[cf, cr - cf], [bf, br - bf]], alternative="greater")`` and
``mannwhitneyu(c, b, alternative="greater", method="asymptotic", use_continuity=True)``.
"""

import json
import math

import pytest

from workflows.deployments.analysis import (
    Sample,
    Verdict,
    fisher_one_sided,
    judge,
    mann_whitney_greater,
    p95,
)


@pytest.mark.parametrize(
    ("canary_failures", "canary_runs", "baseline_failures", "baseline_runs", "expected"),
    [
        (3, 20, 0, 20, 0.1153846153846154),
        (5, 20, 1, 40, 0.013161590017229994),
        (0, 10, 0, 10, 1.0),
        (2, 30, 2, 30, 0.6940231935771632),
        (1, 20, 5, 20, 0.9899019899019899),
        (10, 50, 3, 60, 0.016038810954822683),
        (7, 12, 2, 15, 0.019374523264683453),
        (4, 20, 40, 400, 0.1457979791146628),
        (20, 20, 0, 20, 7.254444551924844e-12),
        (300, 20000, 200, 20000, 3.925724952469324e-06),
        (210, 20000, 200, 20000, 0.3275449698319887),
    ],
)
def test_fisher_matches_scipy(
    canary_failures, canary_runs, baseline_failures, baseline_runs, expected
):
    p = fisher_one_sided(canary_failures, canary_runs, baseline_failures, baseline_runs)
    assert p == pytest.approx(expected, rel=1e-9)


def test_fisher_with_large_counts_does_not_overflow_and_is_sane():
    same = fisher_one_sided(2000, 20000, 2000, 20000)
    assert 0.4 < same < 0.6
    assert fisher_one_sided(2000, 20000, 0, 20000) == pytest.approx(0.0, abs=1e-300)
    assert fisher_one_sided(0, 20000, 2000, 20000) == 1.0
    # More canary failures against the same baseline: stronger evidence, smaller p.
    ps = [fisher_one_sided(k, 20000, 200, 20000) for k in (150, 200, 250, 300)]
    assert ps == sorted(ps, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in ps)


def test_fisher_rejects_impossible_counts():
    with pytest.raises(ValueError):
        fisher_one_sided(5, 3, 0, 10)
    with pytest.raises(ValueError):
        fisher_one_sided(0, 10, -1, 10)


@pytest.mark.parametrize(
    ("canary", "baseline", "expected"),
    [
        ([5.1, 6.2, 7.3, 8.4, 9.5, 10.6], [1.0, 2.0, 3.0, 4.5, 5.5, 6.0, 7.0], 0.00920808028815198),
        ([3, 3, 4, 5, 5, 5, 6], [1, 2, 3, 3, 4, 4, 5], 0.05039264915365498),
        ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], 0.5587899429622483),
        ([1, 2, 3], [4, 5, 6, 7], 0.9892218666199918),
        # One very slow canary run does not make the canary "slower".
        (
            [10.0, 11.0, 12.0, 13.0, 14.0, 300.0],
            [10.5, 11.5, 12.5, 13.5, 14.5, 15.5],
            0.6555397220977697,
        ),
    ],
    ids=["distinct", "ties", "identical", "canary-faster", "one-outlier"],
)
def test_mann_whitney_matches_scipy(canary, baseline, expected):
    assert mann_whitney_greater(canary, baseline) == pytest.approx(expected, rel=1e-6)


def test_mann_whitney_without_evidence_is_one():
    assert mann_whitney_greater([], [1.0, 2.0]) == 1.0
    assert mann_whitney_greater([1.0, 2.0], []) == 1.0
    assert mann_whitney_greater([], []) == 1.0
    assert mann_whitney_greater([2.0, 2.0, 2.0], [2.0, 2.0]) == 1.0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        ([7.5], 7.5),
        ([3.0, 1.0, 2.0], 3.0),
        (list(range(1, 21)), 19),  # ceil(0.95 * 20) = 19th
        (list(range(1, 22)), 20),  # ceil(0.95 * 21) = ceil(19.95) = 20th
        (list(range(100, 0, -1)), 95),
    ],
)
def test_p95_nearest_rank(values, expected):
    assert p95(values) == expected


# --- judge -------------------------------------------------------------------------------

FAST = tuple(10.0 + 0.5 * i for i in range(30))  # p95 24.00s


def sample(runs, failures, durations=()):
    return Sample(runs=runs, failures=failures, durations=tuple(durations))


def assert_json_evidence(verdict: Verdict):
    json.dumps(verdict.evidence, allow_nan=False)
    assert set(verdict.evidence) >= {
        "canary",
        "baseline",
        "fisher_p",
        "mann_whitney_p",
        "min_runs",
        "alpha",
    }
    for side in ("canary", "baseline"):
        assert set(verdict.evidence[side]) == {"runs", "failures", "failure_rate", "p95_seconds"}


def test_waits_below_min_runs():
    verdict = judge(sample(5, 3), sample(100, 0), min_runs=20)
    assert verdict.decision == "wait"
    assert "5 of the 20" in verdict.reason
    assert verdict.evidence["fisher_p"] is None
    assert_json_evidence(verdict)


def test_aborts_on_significantly_more_failures():
    verdict = judge(sample(50, 10), sample(60, 3), min_runs=20)
    assert verdict.decision == "abort"
    assert verdict.reason == (
        "canary failed 10 of 50 runs (20.0%) against 5.0% for the baseline; "
        "Fisher's exact test p=0.0160"
    )
    assert verdict.evidence["fisher_p"] == pytest.approx(0.016038810954822683, rel=1e-9)
    assert_json_evidence(verdict)


def test_aborts_when_slower_significantly_and_by_enough():
    slow = tuple(20.0 + i for i in range(30))  # p95 48.00s, twice the baseline
    verdict = judge(sample(30, 0, slow), sample(30, 0, FAST), min_runs=20)
    assert verdict.decision == "abort"
    assert "p95 48.00s against 24.00s" in verdict.reason
    assert "Mann-Whitney U test p=2.20e-10" in verdict.reason
    assert verdict.evidence["mann_whitney_p"] < 1e-9
    assert_json_evidence(verdict)


def test_significant_but_small_slowdown_is_promoted():
    # Every run 3s slower: significant, but the p95 is only 12.5% higher (27s against 24s).
    slightly = tuple(d + 3.0 for d in FAST) * 3
    verdict = judge(sample(90, 0, slightly), sample(90, 0, FAST * 3), min_runs=20)
    assert verdict.evidence["mann_whitney_p"] < 0.001
    assert verdict.decision == "promote"


def test_durations_are_not_compared_below_min_runs():
    slow = tuple(20.0 + i for i in range(30))
    verdict = judge(sample(30, 0, slow[:10]), sample(30, 0, FAST), min_runs=20)
    assert verdict.decision == "promote"
    assert verdict.evidence["mann_whitney_p"] is None


def test_promotes_a_healthy_canary():
    verdict = judge(sample(30, 1, FAST), sample(40, 2, FAST), min_runs=20)
    assert verdict.decision == "promote"
    assert verdict.reason == (
        "canary 30 runs, 3.3% failed (baseline 5.0%), p95 24.00s (baseline 24.00s): "
        "no evidence it is worse"
    )
    assert 0.05 <= verdict.evidence["fisher_p"] <= 1
    assert verdict.evidence["canary"] == {
        "runs": 30,
        "failures": 1,
        "failure_rate": pytest.approx(1 / 30),
        "p95_seconds": 24.0,
    }
    assert_json_evidence(verdict)


def test_an_insignificant_but_large_excess_waits_then_aborts():
    # 20% against 10%: not significant at these counts, but too much to promote on.
    early = judge(sample(20, 4), sample(20, 2), min_runs=20)
    assert early.evidence["fisher_p"] >= 0.05
    assert early.decision == "wait"
    assert "canary failed 4 of 20 runs (20.0%) against 10.0% for the baseline" in early.reason
    assert "up to 60 runs" in early.reason

    late = judge(sample(60, 12), sample(60, 6), min_runs=20)
    assert late.evidence["fisher_p"] >= 0.05
    assert late.decision == "abort"
    assert "12 of 60 runs (20.0%)" in late.reason
    assert "still after 60 runs" in late.reason


def test_a_small_excess_is_promoted():
    verdict = judge(sample(40, 3), sample(40, 2), min_runs=20)  # 7.5% against 5.0%
    assert verdict.decision == "promote"


def test_abort_on_durations_comes_before_waiting_on_an_excess():
    slow = tuple(20.0 + i for i in range(30))
    verdict = judge(sample(30, 6, slow), sample(30, 3, FAST), min_runs=20)
    assert verdict.evidence["fisher_p"] >= 0.05
    assert verdict.decision == "abort"
    assert "Mann-Whitney" in verdict.reason


def test_thin_baseline_judges_the_canary_alone():
    healthy = judge(sample(20, 1), sample(3, 0), min_runs=20)
    assert healthy.decision == "promote"
    assert healthy.reason.startswith("baseline had only 3 runs in the window")
    assert "1 of 20 runs (5.0%)" in healthy.reason
    assert healthy.evidence["fisher_p"] is None
    assert_json_evidence(healthy)

    failing = judge(sample(20, 2), sample(0, 0), min_runs=20)
    assert failing.decision == "abort"
    assert "baseline had only 0 runs" in failing.reason
    assert "2 of 20 runs (10.0%), above the 5.0% limit" in failing.reason
    assert failing.evidence["baseline"]["failure_rate"] is None
    assert_json_evidence(failing)


def test_sample_rejects_impossible_counts():
    with pytest.raises(ValueError):
        Sample(runs=3, failures=4, durations=())
    with pytest.raises(ValueError):
        Sample(runs=-1, failures=0, durations=())


def test_p_values_are_probabilities():
    for cf in range(0, 11):
        p = fisher_one_sided(cf, 10, 5, 10)
        assert 0.0 <= p <= 1.0 and not math.isnan(p)
