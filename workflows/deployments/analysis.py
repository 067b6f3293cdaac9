"""Canary analysis: is the new version of a workflow worse than the one it replaces?

A canary step runs the new version (the canary) next to the current one (the baseline)
over the same window. ``judge`` compares the finished runs of both and answers
"wait", "promote" or "abort", with one sentence an operator can read and the numbers.

The rules, in the order they are checked:

1. The canary has fewer than ``min_runs`` finished runs: wait.
2. The baseline has fewer than ``min_runs`` runs: there is nothing to compare with, so the
   canary is judged alone. Abort if more than ``max_failure_excess`` of its runs failed,
   otherwise promote.
3. The canary fails significantly more often than the baseline (Fisher's exact test,
   p < ``alpha``): abort.
4. Both versions have at least ``min_runs`` known durations, the canary is significantly
   slower (Mann-Whitney U test, p < ``alpha``) and its p95 is more than ``slower_factor``
   times the baseline's: abort.
5. The canary's failure rate is more than ``max_failure_excess`` above the baseline's, but
   not significantly so: do not promote on noise. Wait until the canary has 3 x ``min_runs``
   runs; if the excess is still there then, abort. So it never waits forever.
6. Otherwise: promote.

Abort rules (3, 4) come before the waiting rule (5): waiting cannot change a verdict that
the evidence already supports.

Why Fisher's exact test for failures: a canary step has small counts (a few failures in a
few dozen runs). The test is exact for any count and needs no normal approximation, which
is wrong for counts this small. It is one-sided because only a canary that fails MORE
often matters; one that fails less is fine.

Why the Mann-Whitney U test for durations: run durations are skewed (a long tail of slow
runs), so a test that assumes normal data (a t-test) would mislead. Mann-Whitney compares
ranks, assumes no distribution and one very slow run cannot swing it. The p95 condition
makes sure the slowdown is also large enough to matter, not only significant.

No flapping: a verdict is only given once the canary has ``min_runs`` finished runs in the
step. "abort" and "promote" are final for the step; the caller never asks again.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Sample", "Verdict", "fisher_one_sided", "judge", "mann_whitney_greater", "p95"]


@dataclass(frozen=True)
class Sample:
    """Finished runs of one version over the same window."""

    runs: int  # finished runs (succeeded + failed)
    failures: int  # failed runs among them
    durations: tuple[float, ...]  # seconds, of the finished runs (may be fewer than runs)

    def __post_init__(self):
        if self.runs < 0 or not 0 <= self.failures <= self.runs:
            raise ValueError(f"need 0 <= failures <= runs, got {self.failures} of {self.runs}")


@dataclass(frozen=True)
class Verdict:
    decision: str  # "wait", "promote" or "abort"
    reason: str  # one sentence for the operator, with the numbers
    evidence: dict  # JSON-serialisable numbers behind the decision


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_one_sided(
    canary_failures: int, canary_runs: int, baseline_failures: int, baseline_runs: int
) -> float:
    """p-value of Fisher's exact test, H1 = the canary fails more often than the baseline.

    The canary's failure count follows a hypergeometric distribution given the totals;
    p is its upper tail P(X >= canary_failures). Log-factorials keep large counts finite.
    """
    if not (0 <= canary_failures <= canary_runs and 0 <= baseline_failures <= baseline_runs):
        raise ValueError("need 0 <= failures <= runs for both samples")
    total = canary_runs + baseline_runs
    failed = canary_failures + baseline_failures
    denominator = _log_comb(total, canary_runs)
    logs = [
        _log_comb(failed, k) + _log_comb(total - failed, canary_runs - k) - denominator
        for k in range(canary_failures, min(failed, canary_runs) + 1)
    ]
    # Sum in a shifted scale so terms far below the largest one do not all underflow.
    top = max(logs)
    p = math.exp(top) * math.fsum(math.exp(value - top) for value in logs)
    return min(1.0, max(0.0, p))


def mann_whitney_greater(canary: Sequence[float], baseline: Sequence[float]) -> float:
    """p-value of the Mann-Whitney U test, H1 = canary durations tend to be larger.

    Normal approximation with tie and continuity correction (as scipy's "asymptotic").
    1.0 if either sample is empty or all values are tied: there is no evidence then.
    """
    n1, n2 = len(canary), len(baseline)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = sorted([(value, True) for value in canary] + [(value, False) for value in baseline])
    n = n1 + n2
    canary_rank_sum = 0.0
    tie_term = 0
    i = 0
    while i < n:
        j = i
        while j < n and pooled[j][0] == pooled[i][0]:
            j += 1
        mid_rank = (i + 1 + j) / 2  # tied values share the mean of their ranks i+1..j
        canary_rank_sum += mid_rank * sum(1 for _, is_canary in pooled[i:j] if is_canary)
        tie_term += (j - i) ** 3 - (j - i)
        i = j
    u = canary_rank_sum - n1 * (n1 + 1) / 2
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return min(1.0, max(0.0, 0.5 * math.erfc(z / math.sqrt(2))))


def p95(values: Sequence[float]) -> float | None:
    """95th percentile by nearest rank: the smallest value >= 95% of the sample."""
    if not values:
        return None
    rank = (95 * len(values) + 99) // 100  # ceil(0.95 n) in integers, no float rounding
    return sorted(values)[rank - 1]


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f}%"


def _secs(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}s"


def _summary(sample: Sample) -> dict:
    rate = sample.failures / sample.runs if sample.runs else None
    return {
        "runs": sample.runs,
        "failures": sample.failures,
        "failure_rate": rate,
        "p95_seconds": p95(sample.durations),
    }


def judge(
    canary: Sample,
    baseline: Sample,
    *,
    min_runs: int,
    alpha: float = 0.05,
    max_failure_excess: float = 0.05,
    slower_factor: float = 1.25,
) -> Verdict:
    """Wait, promote or abort the canary; the rules are in the module docstring."""
    if min_runs < 1 or not 0 < alpha < 1:
        raise ValueError("need min_runs >= 1 and 0 < alpha < 1")
    evidence = {
        "canary": _summary(canary),
        "baseline": _summary(baseline),
        "fisher_p": None,
        "mann_whitney_p": None,
        "min_runs": min_runs,
        "alpha": alpha,
        "max_failure_excess": max_failure_excess,
        "slower_factor": slower_factor,
    }
    c_rate, c_p95 = evidence["canary"]["failure_rate"], evidence["canary"]["p95_seconds"]
    b_rate, b_p95 = evidence["baseline"]["failure_rate"], evidence["baseline"]["p95_seconds"]

    def verdict(decision: str, reason: str) -> Verdict:
        return Verdict(decision, reason, evidence)

    if canary.runs < min_runs:
        return verdict(
            "wait", f"canary has {canary.runs} of the {min_runs} finished runs needed for a verdict"
        )
    failed = f"canary failed {canary.failures} of {canary.runs} runs ({_pct(c_rate)})"

    if baseline.runs < min_runs:
        # Too few baseline runs for a comparison: hold the canary to an absolute limit.
        thin = f"baseline had only {baseline.runs} runs in the window, so the canary is judged alone: {failed}"
        if c_rate > max_failure_excess:
            return verdict("abort", f"{thin}, above the {_pct(max_failure_excess)} limit")
        return verdict("promote", f"{thin}, within the {_pct(max_failure_excess)} limit")

    p_fail = fisher_one_sided(canary.failures, canary.runs, baseline.failures, baseline.runs)
    evidence["fisher_p"] = p_fail
    against = f"{failed} against {_pct(b_rate)} for the baseline"
    if p_fail < alpha:
        return verdict("abort", f"{against}; Fisher's exact test p={p_fail:#.3g}")

    if min(len(canary.durations), len(baseline.durations)) >= min_runs:
        p_slow = mann_whitney_greater(canary.durations, baseline.durations)
        evidence["mann_whitney_p"] = p_slow
        if p_slow < alpha and c_p95 > slower_factor * b_p95:
            return verdict(
                "abort",
                f"canary is slower: p95 {_secs(c_p95)} against {_secs(b_p95)} for the baseline "
                f"(more than {slower_factor:g}x); Mann-Whitney U test p={p_slow:#.3g}",
            )

    if c_rate - b_rate > max_failure_excess:
        # Not significant yet, but too large to promote on: more runs decide, up to a cap.
        excess = f"{against}, more than {max_failure_excess * 100:.1f} points worse (Fisher's exact test p={p_fail:#.3g})"
        if canary.runs < 3 * min_runs:
            return verdict("wait", f"{excess}; waiting for up to {3 * min_runs} runs")
        return verdict(
            "abort", f"{excess}, still after {canary.runs} runs (3x the minimum of {min_runs})"
        )

    return verdict(
        "promote",
        f"canary {canary.runs} runs, {_pct(c_rate)} failed (baseline {_pct(b_rate)}), "
        f"p95 {_secs(c_p95)} (baseline {_secs(b_p95)}): no evidence it is worse",
    )
