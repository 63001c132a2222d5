"""Torch-free statistics of empirical privacy audits.

GDP conversions and fits, the one-run (Steinke–Nasr–Jagielski 2023) p-value and ε lower
bounds, and group privacy.

Everything here is plain math on numbers or score arrays (numpy/scipy); the code that produces
the scores by running the toolkit's DP-SGD step lives in :mod:`fedsb_dp.audit`.

* Gaussian DP (Dong, Roth, Su): a mechanism is μ-GDP when distinguishing neighbours is no
  easier than telling N(0, 1) from N(μ, 1). Its (ε, δ) curve is
  δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). The Gaussian mechanism with noise multiplier σ on a
  sum of C-clipped terms is exactly (1/σ)-GDP.
* One-run audit: m canaries, each included by a fair coin; the auditor guesses "in" for its r
  highest-scoring canaries and is right v times. Under (ε, δ)-DP the p-value of v is
  p = min(1, β + 2mδα) with q = e^ε/(1+e^ε), β = P[Bin(r, q) ≥ v] and
  α = max_{i=1..v} P[v−i ≤ Bin(r, q) < v]/i. The ε lower bound is the largest ε with p below the
  significance level; over a family of guess counts r = 1, 2, 4, …, m fixed by m before the
  scores are seen, with a Bonferroni correction by its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from accounting.errors import AccountingError

_MAX_EPSILON = 1e4  # past this the GDP curve's δ underflows; treated as "unbounded"


def _check_open_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise AccountingError(f"{name}={value!r} must be in (0, 1)")


def _check_mu(mu: float) -> None:
    if not (isinstance(mu, int | float) and mu >= 0 and math.isfinite(mu)):
        raise AccountingError(f"mu={mu!r} must be a finite number ≥ 0")


# ------------------------------------------------------------------------------ Gaussian DP
def gdp_log_delta(epsilon: float, mu: float) -> float:
    """Natural log of δ(ε) of μ-GDP, computed in the log domain so large ε do not underflow.

    Args:
        epsilon: ε ≥ 0.
        mu: μ ≥ 0.

    Returns:
        log(Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)); ``-inf`` for μ = 0.
    """
    _check_mu(mu)
    if not epsilon >= 0:
        raise AccountingError(f"epsilon={epsilon!r} must be ≥ 0")
    if mu == 0:
        return -math.inf
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    if b >= a:  # rounding at extreme ε: the difference is below float resolution
        return -math.inf
    return float(a + math.log1p(-math.exp(b - a)))


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of a μ-GDP mechanism: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    return math.exp(gdp_log_delta(epsilon, mu))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ ``delta`` for a μ-GDP mechanism.

    Args:
        mu: μ ≥ 0 (e.g. 1/σ for one Gaussian step on C-clipped gradients, q = 1).
        delta: δ in (0, 1).

    Returns:
        ε ≥ 0 (0 when even ε = 0 meets δ).
    """
    _check_mu(mu)
    _check_open_unit("delta", delta)
    target = math.log(delta)
    if gdp_log_delta(0.0, mu) <= target:
        return 0.0
    hi = max(1.0, mu * mu)
    while gdp_log_delta(hi, mu) > target:
        hi *= 2
        if hi > _MAX_EPSILON:
            return math.inf
    return float(optimize.brentq(lambda e: gdp_log_delta(e, mu) - target, 0.0, hi, xtol=1e-10))


@dataclass(frozen=True)
class GdpFit:
    """A Gaussian-DP fit of two score samples (equal-variance Gaussian shift model).

    Attributes:
        mu_hat: (mean_in − mean_out) / pooled standard deviation.
        mu_lower: One-sided lower confidence bound on μ at ``confidence``.
        standard_error: Standard error of ``mu_hat`` (large-sample, Hedges–Olkin).
        confidence: The confidence level of ``mu_lower``.
        n_in: Scores drawn with the canary present.
        n_out: Scores drawn without it.
        std_in: Standard deviation of the in-scores (equal to ``std_out`` under the model).
        std_out: Standard deviation of the out-scores.
    """

    mu_hat: float
    mu_lower: float
    standard_error: float
    confidence: float
    n_in: int
    n_out: int
    std_in: float
    std_out: float

    def epsilon_lower(self, delta: float) -> float:
        """ε(δ) of μ = ``mu_lower``: the audit's lower bound on the true ε."""
        return gdp_epsilon(max(self.mu_lower, 0.0), delta)

    def epsilon_hat(self, delta: float) -> float:
        """ε(δ) of μ = ``mu_hat``: the point estimate."""
        return gdp_epsilon(max(self.mu_hat, 0.0), delta)


def fit_gdp(in_scores: np.typing.ArrayLike, out_scores: np.typing.ArrayLike, *,
            confidence: float = 0.95) -> GdpFit:
    """Fit μ of Gaussian DP to scores of a canary present (in) and absent (out).

    The model: out ~ N(a, s²), in ~ N(a + μs, s²). It is exact when the score is the projection
    of a Gaussian-noised clipped sum on the canary's direction (the DP-SGD step on a fixed
    batch), which is what the step-level audit measures; for other score distributions the fit
    is an estimate, not a distribution-free bound.

    Args:
        in_scores: Scores with the canary in the batch (≥ 2 values).
        out_scores: Scores without it (≥ 2 values).
        confidence: Level of the one-sided lower bound, in (0, 1).

    Returns:
        The fit.
    """
    _check_open_unit("confidence", confidence)
    x1 = np.asarray(in_scores, dtype=np.float64).ravel()
    x0 = np.asarray(out_scores, dtype=np.float64).ravel()
    if x1.size < 2 or x0.size < 2:
        raise AccountingError(
            f"need ≥ 2 scores per world, got {x1.size} in and {x0.size} out")
    n1, n0 = x1.size, x0.size
    s1, s0 = float(x1.std(ddof=1)), float(x0.std(ddof=1))
    pooled = math.sqrt(((n1 - 1) * s1 ** 2 + (n0 - 1) * s0 ** 2) / (n1 + n0 - 2))
    if pooled == 0:
        raise AccountingError("scores have zero variance: no noise was added (ε = ∞)")
    mu_hat = float(x1.mean() - x0.mean()) / pooled
    se = math.sqrt((n1 + n0) / (n1 * n0) + mu_hat ** 2 / (2 * (n1 + n0)))
    z = float(stats.norm.ppf(confidence))
    return GdpFit(mu_hat, mu_hat - z * se, se, confidence, n1, n0, s1, s0)


# ------------------------------------------------------------------------------ one-run audit
def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """p-value of ``correct`` right guesses out of ``guesses`` under (ε, δ)-DP (SNJ 2023, Thm 3).

    Args:
        m: Number of canaries (each included by a fair coin).
        guesses: r, the number of guesses made (0 ≤ r ≤ m).
        correct: v, how many were right (0 ≤ v ≤ r).
        epsilon: ε ≥ 0 of the null hypothesis.
        delta: δ in [0, 1] of the null hypothesis.

    Returns:
        p = min(1, β + 2mδα), q = e^ε/(1+e^ε), β = P[Bin(r,q) ≥ v],
        α = max_{i=1..v} P[v−i ≤ Bin(r,q) < v]/i.
    """
    if not (isinstance(m, int | np.integer) and m >= 1):
        raise AccountingError(f"m={m!r} must be an integer ≥ 1")
    if not 0 <= guesses <= m:
        raise AccountingError(f"guesses={guesses!r} must be in [0, m={m}]")
    if not 0 <= correct <= guesses:
        raise AccountingError(f"correct={correct!r} must be in [0, guesses={guesses}]")
    if not epsilon >= 0:
        raise AccountingError(f"epsilon={epsilon!r} must be ≥ 0")
    if not 0 <= delta <= 1:
        raise AccountingError(f"delta={delta!r} must be in [0, 1]")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    # P[v−i ≤ B < v] for i = 1..v is a running sum of the pmf from v−1 downwards.
    pmf = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1)))
    return min(beta + 2 * m * delta * alpha, 1.0)


def one_run_epsilon(m: int, guesses: int, correct: int, *, delta: float,
                    significance: float = 0.05, floor: float = 0.0) -> float:
    """Largest ε whose (ε, δ)-DP claim is rejected at ``significance`` (else ``floor``).

    The p-value grows with ε, so the bound is the root of p(ε) = significance.

    Args:
        m: Number of canaries.
        guesses: r.
        correct: v.
        delta: δ of the claims tested.
        significance: Test level (0.05 for 95 % confidence).
        floor: Smallest ε worth reporting; returned when nothing above it is rejected.

    Returns:
        The ε lower bound.
    """
    _check_open_unit("significance", significance)
    if guesses == 0 or one_run_p_value(m, guesses, correct, floor, 0.0) >= significance:
        return floor  # not even δ = 0 is rejected at the floor

    def gap(eps: float) -> float:
        return significance - one_run_p_value(m, guesses, correct, eps, delta)

    if gap(floor) <= 0:
        return floor
    lo, hi = floor, max(1.0, 2 * floor)
    while gap(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > _MAX_EPSILON:
            return math.inf
    return float(optimize.brentq(gap, lo, hi, xtol=1e-9))


def roc_frontier(in_scores: np.typing.ArrayLike, out_scores: np.typing.ArrayLike,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts at the thresholds on the ROC curve's concave frontier.

    A canary is guessed "in" when its score is ≥ the threshold. Thresholds that are (weakly)
    dominated by mixing two others are dropped. jax_privacy's reference values correct over
    this frontier; :func:`one_run_epsilon_from_scores` does not (the frontier is chosen from
    the same scores), but the frontier is kept to reproduce those values.

    Returns:
        (true positives, false positives), one entry per frontier threshold.
    """
    x1 = np.sort(np.asarray(in_scores, dtype=np.float64).ravel())
    x0 = np.sort(np.asarray(out_scores, dtype=np.float64).ravel())
    if x1.size == 0 or x0.size == 0:
        raise AccountingError(
            f"need in- and out-scores, got {x1.size} in and {x0.size} out")
    thresholds = np.concatenate([np.union1d(x1, x0), [np.inf]])
    fn = np.searchsorted(x1, thresholds, side="left")
    tn = np.searchsorted(x0, thresholds, side="left")
    # Upper concave hull of (fn, tn) by a monotone chain: drop a point when it does not make a
    # strict clockwise turn with its neighbours.
    hull: list[int] = []
    for i in range(len(thresholds)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (fn[b] - fn[a]) * (tn[i] - tn[a]) - (tn[b] - tn[a]) * (fn[i] - fn[a])
            if cross < 0:
                break
            hull.pop()
        hull.append(i)
    index = np.asarray(hull)
    return x1.size - fn[index], x0.size - tn[index]


@dataclass(frozen=True)
class OneRunBound:
    """ε lower bound of a one-run audit.

    Attributes:
        epsilon_lower: Largest ε rejected at ``significance`` (Bonferroni over the family).
        ceiling: The bound a perfect attack would reach with the same canary counts and δ.
        guesses: r at the threshold that gave the bound.
        correct: v at that threshold.
        m: Number of canaries.
        n_in: Canaries that were included.
        delta: δ.
        significance: Overall test level.
        thresholds_tested: The Bonferroni factor: the size of the family of tests
            (:func:`guess_counts`), fixed by m before any score is seen.
    """

    epsilon_lower: float
    ceiling: float
    guesses: int
    correct: int
    m: int
    n_in: int
    delta: float
    significance: float
    thresholds_tested: int


def best_one_run_epsilon(m: int, guesses: np.typing.ArrayLike, correct: np.typing.ArrayLike,
                         *, delta: float, level: float) -> tuple[float, int, int]:
    """The largest :func:`one_run_epsilon` over candidate guess counts, each at ``level``.

    The caller chooses the family of candidates and the per-test level (its significance over
    the family size).

    Args:
        m: Number of canaries.
        guesses: r of each candidate.
        correct: v of each candidate.
        delta: δ of the claims tested.
        level: Significance of each single test.

    Returns:
        (ε bound, r, v) of the best candidate; (0.0, 0, 0) when none rejects ε = 0.
    """
    r_all = np.asarray(guesses, dtype=np.int64).ravel()
    v_all = np.asarray(correct, dtype=np.int64).ravel()
    if r_all.shape != v_all.shape:
        raise AccountingError(
            f"guesses and correct differ in length: {r_all.size} vs {v_all.size}")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(r_all > 0, v_all / np.maximum(r_all, 1), 0.0)
    best, best_r, best_v = 0.0, 0, 0
    # Highest precision first, so that later candidates are mostly skipped without a search.
    for idx in np.argsort(-precision, kind="stable"):
        r, v = int(r_all[idx]), int(v_all[idx])
        # v ≤ r·q(best) puts v at or below the median of Bin(r, q): β ≥ ½, nothing rejected.
        if r == 0 or v / r <= special.expit(best):
            continue
        eps = one_run_epsilon(m, r, v, delta=delta, significance=level, floor=best)
        if eps > best:
            best, best_r, best_v = eps, r, v
    return best, best_r, best_v


def guess_counts(m: int) -> np.ndarray:
    """The one-run audit's family of tests: "guess in for the r top scores", r = 1, 2, 4, …, m.

    A doubling grid fixed by m alone, before any score is seen (⌊log₂ m⌋ + 1 or + 2 tests), so
    a Bonferroni correction by its size is valid. Every one of the m + 1 thresholds would also
    be a fixed family, but the p-value's δ term 2mδα (α ≥ 1/v) is not divided by the family
    size, so a correction by m + 1 rejects nothing unless δ ≪ significance / (2m²).
    """
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise AccountingError(f"m={m!r} must be an integer ≥ 1")
    counts = 1 << np.arange(int(m).bit_length(), dtype=np.int64)
    return np.union1d(counts[counts < m], [m])


def top_r_correct(in_scores: np.typing.ArrayLike, out_scores: np.typing.ArrayLike,
                  guesses: np.typing.ArrayLike) -> np.ndarray:
    """Correct guesses when guessing "in" for the r top scores, for each r in ``guesses``.

    When the r-th score is tied, the tied canaries guessed "in" are counted as the excluded
    ones first. That is never more than a tie-break independent of the membership would get,
    so a test on it stays valid.
    """
    x1 = np.sort(np.asarray(in_scores, dtype=np.float64).ravel())
    x0 = np.sort(np.asarray(out_scores, dtype=np.float64).ravel())
    r = np.asarray(guesses, dtype=np.int64)
    scores = np.sort(np.concatenate([x1, x0]))[::-1]
    if r.size and not (r.min() >= 1 and r.max() <= scores.size):
        raise AccountingError(f"guess counts must be in [1, m={scores.size}], got "
                              f"{r.min()}..{r.max()}")
    cut = scores[r - 1]
    in_above = x1.size - np.searchsorted(x1, cut, side="right")
    out_above = x0.size - np.searchsorted(x0, cut, side="right")
    out_tied = np.searchsorted(x0, cut, side="right") - np.searchsorted(x0, cut, side="left")
    from_tie = r - in_above - out_above  # guesses taken from the tied group
    return in_above + np.maximum(0, from_tie - out_tied)


def one_run_epsilon_from_scores(in_scores: np.typing.ArrayLike,
                                out_scores: np.typing.ArrayLike, *, delta: float,
                                significance: float = 0.05) -> OneRunBound:
    """ε lower bound of a one-run audit from the scores of included and excluded canaries.

    The family of tests is fixed by m alone, before any score is looked at
    (:func:`guess_counts`: "guess in for the r top scores", r = 1, 2, 4, …, m). Each is tested
    at ``significance / family size`` (Bonferroni), so the reported bound is the largest ε at
    which the smallest p-value over the family, times the family size, is below
    ``significance``. (Dividing by the size of the ROC frontier instead, which is chosen from
    the same scores, is not a valid correction.) The ceiling is what a perfect attack (every
    included canary ranked first) would reach with the same counts and family.

    Args:
        in_scores: Scores of the canaries that were included.
        out_scores: Scores of the canaries that were not.
        delta: δ of the claims tested, in (0, 1].
        significance: Overall test level (0.05 for 95 % confidence).

    Returns:
        The bound, its ceiling and the winning test's counts.
    """
    if not 0 < delta <= 1:
        raise AccountingError(f"delta={delta!r} must be in (0, 1]")
    _check_open_unit("significance", significance)
    x1 = np.asarray(in_scores, dtype=np.float64).ravel()
    x0 = np.asarray(out_scores, dtype=np.float64).ravel()
    if x1.size == 0 or x0.size == 0:
        raise AccountingError(
            f"need in- and out-scores, got {x1.size} in and {x0.size} out")
    m = int(x1.size + x0.size)
    family = guess_counts(m)
    level = significance / family.size
    eps, r, v = best_one_run_epsilon(m, family, top_r_correct(x1, x0, family), delta=delta,
                                     level=level)
    ceiling = best_one_run_epsilon(m, family, np.minimum(family, x1.size), delta=delta,
                                   level=level)[0]
    return OneRunBound(eps, ceiling, r, v, m, int(x1.size), delta, significance,
                       int(family.size))


# ------------------------------------------------------------------------------ group privacy
@dataclass(frozen=True)
class GroupPrivacy:
    """(ε_k, δ_k) for a user holding k records.

    Attributes:
        k: Records held by the user.
        epsilon: ε_k.
        delta: δ_k.
        method: ``"generic"`` (the (ε, δ) group bound, any mechanism) or ``"gaussian"``
            (exact for compositions of unsampled Gaussian mechanisms).
    """

    k: int
    epsilon: float
    delta: float
    method: str


def group_privacy(epsilon: float, delta: float, k: int) -> GroupPrivacy:
    """The standard group bound: (ε, δ)-DP per record ⇒ (kε, δ_k)-DP for k records.

    Chaining k neighbouring datasets gives δ_k = δ Σ_{i<k} e^{iε} = δ (e^{kε} − 1)/(e^ε − 1),
    which is ≤ k e^{(k−1)ε} δ (the form usually quoted). It holds for every mechanism, and is
    the only group statement made for Poisson-subsampled histories: composing a PLD or RDP
    "k times the sensitivity" is not valid under subsampling. δ_k grows like e^{kε}, so a
    meaningful group guarantee needs a small per-record δ.

    Args:
        epsilon: Per-record ε ≥ 0.
        delta: Per-record δ in [0, 1).
        k: Records held by the user, ≥ 1.

    Returns:
        The group guarantee (δ_k capped at 1).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AccountingError(f"k={k!r} must be an integer ≥ 1")
    if not epsilon >= 0:
        raise AccountingError(f"epsilon={epsilon!r} must be ≥ 0")
    if not 0 <= delta < 1:
        raise AccountingError(f"delta={delta!r} must be in [0, 1)")
    if math.isinf(epsilon):
        return GroupPrivacy(k, math.inf, 1.0, "generic")
    factor = float(k) if epsilon == 0 else math.expm1(k * epsilon) / math.expm1(epsilon)
    return GroupPrivacy(k, k * epsilon, min(1.0, delta * factor), "generic")


def gaussian_group_epsilon(mu: float, k: int, delta: float) -> GroupPrivacy:
    """ε_k at δ for a user with k records under a μ-GDP composition of unsampled Gaussians.

    Without subsampling, k records shift the noisy sums by at most k times the clip norm, so
    the composition is exactly (kμ)-GDP; this is much tighter than :func:`group_privacy`.
    Do not use it for Poisson-subsampled steps (their privacy loss is not Gaussian).

    Args:
        mu: μ of the per-record guarantee (√T/σ for T unsampled steps of noise multiplier σ).
        k: Records held by the user, ≥ 1.
        delta: δ in (0, 1).

    Returns:
        The group guarantee at ``delta``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AccountingError(f"k={k!r} must be an integer ≥ 1")
    return GroupPrivacy(k, gdp_epsilon(k * mu, delta), delta, "gaussian")
