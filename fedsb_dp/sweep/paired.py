"""Paired differences between two methods across seeds, with a t confidence interval.

The seed fixes the client split, the Poisson batches and the DP noise of a cell, so two methods
run at the same seed share everything the seed draws; their accuracy difference at that seed
is one observation, and the seeds give n independent observations. The interval is the
Student-t interval of their mean, mean ± t_{n−1, 1−(1−c)/2} · s / √n (s the sample standard
deviation of the differences, n − 1 degrees of freedom): exact for normal differences, and
with three seeds very wide (t = 4.30 at 95 %). A difference whose interval contains 0 gets no
verdict: "not distinguishable".

Which rival is "best" is chosen on the same test accuracies the interval is computed from, so
the interval against the best baseline is optimistic for the baseline's side (a winner's-curse
selection); it is reported as such, not corrected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedsb_dp.errors import ConfigError

AHEAD, BEHIND, UNDECIDED = "Fed-SB ahead", "Fed-SB behind", "not distinguishable"
TOO_FEW = "fewer than 2 paired seeds: no interval"


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences (ours − theirs, accuracy points) and its t interval.

    Attributes:
        seeds: The seeds both sides ran, ascending.
        gaps: The difference at each of those seeds, in points.
        mean: Their mean.
        low: Lower end of the interval (``None`` below two pairs).
        high: Upper end of the interval (``None`` below two pairs).
        confidence: The interval's coverage.
    """

    seeds: tuple[int, ...]
    gaps: tuple[float, ...]
    mean: float
    low: float | None
    high: float | None
    confidence: float

    @property
    def verdict(self) -> str:
        """Ahead/behind only when the interval excludes 0; else no verdict."""
        if self.low is None or self.high is None:
            return TOO_FEW
        if self.low > 0:
            return AHEAD
        if self.high < 0:
            return BEHIND
        return UNDECIDED

    def describe(self) -> str:
        """``+1.23 [−0.50, +2.96] (n=3)``, or the mean and n alone below two pairs."""
        if self.low is None:
            return f"{self.mean:+.2f} (n={len(self.gaps)})"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={len(self.gaps)})"


def t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def paired_difference(ours: Mapping[int, float], theirs: Mapping[int, float], *,
                      confidence: float = 0.95, scale: float = 100.0) -> PairedDifference:
    """Pair two methods' results by seed and bound the mean difference.

    Args:
        ours: Seed → our accuracy (fraction).
        theirs: Seed → the rival's accuracy at that seed.
        confidence: Two-sided coverage of the interval, in (0, 1).
        scale: Multiplier of every difference (100: fractions → points).

    Returns:
        The paired difference on the seeds both ran.

    Raises:
        ConfigError: For a confidence outside (0, 1), or no seed in common.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence={confidence!r} must be in (0, 1)")
    seeds = tuple(sorted(set(ours) & set(theirs)))
    if not seeds:
        raise ConfigError(f"no seed in common: ours {sorted(ours)}, theirs {sorted(theirs)}")
    gaps = tuple(scale * (float(ours[s]) - float(theirs[s])) for s in seeds)
    n = len(gaps)
    mean = sum(gaps) / n
    if n < 2:
        return PairedDifference(seeds, gaps, mean, None, None, confidence)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(seeds, gaps, mean, mean - half, mean + half, confidence)


#: Methods that are not adapter baselines: Fed-SB itself, the head alone, pooled references.
HEAD_ONLY = "head-only"
#: Columns that define one comparison: the task (dataset), the federation, the privacy target.
GROUP_KEYS = ("dataset", "num_clients", "partition", "target_epsilon")
PAIRED_COLUMNS = ["dataset", "num_clients", "partition", "target_epsilon", "fedsb", "rival",
                  "difference", "verdict", "gaps"]


def by_seed(frame, method: str, rank: int) -> dict[int, float]:
    """Seed → test accuracy of one (method, rank) (mean if a seed ran twice)."""
    cell = frame[(frame["method"] == method) & (frame["rank"] == rank)]
    return {int(s): float(a) for s, a in cell.groupby("seed")["test_accuracy"].mean().items()}


def best_of(frame, methods) -> tuple[str, int] | None:
    """The (method, rank) with the highest mean accuracy among ``methods``, or ``None``."""
    pool = frame[frame["method"].isin(methods)]
    if pool.empty:
        return None
    means = pool.groupby(["method", "rank"])["test_accuracy"].mean()
    method, rank = means.idxmax()
    return str(method), int(rank)


def contenders(group) -> tuple[tuple[str, int] | None, tuple[str, int] | None,
                             tuple[str, int] | None]:
    """Fed-SB's best rank, head-only, and the most accurate adapter baseline of one cell.

    Each is a (method, rank) or ``None`` if the cell has no such run. Pooled-data references
    (``central-*``) are no federated rival.
    """
    others = [m for m in group["method"].unique()
              if m not in ("fedsb", HEAD_ONLY) and not str(m).startswith("central")]
    return best_of(group, ["fedsb"]), best_of(group, [HEAD_ONLY]), best_of(group, others)


def paired_table(frame, *, confidence: float = 0.95):
    """Fed-SB (best rank) − head-only and − the best adapter baseline, paired by seed.

    One row per comparison and (dataset, clients, partition, target ε): the mean difference
    in accuracy points with its t interval, the verdict (none when the interval contains 0)
    and the per-seed gaps. Rows whose dataset is not recorded (results files written before
    the column existed) count as the default dataset.

    Args:
        frame: Per-run results (``collect_results``, merged files included).
        confidence: Coverage of the intervals.

    Returns:
        A DataFrame with :data:`PAIRED_COLUMNS`.
    """
    import pandas as pd

    from fedsb_dp.data import DEFAULT_DATASET

    frame = frame[frame["test_accuracy"].notna()].copy()
    frame["dataset"] = (frame["dataset"].fillna(DEFAULT_DATASET) if "dataset" in frame
                        else DEFAULT_DATASET)
    if "num_clients" not in frame:
        frame["num_clients"] = frame["clients"]
    rows = []
    for key, group in frame.groupby(list(GROUP_KEYS), sort=True):
        ours, head, baseline = contenders(group)
        if ours is None:
            continue
        for rival in (head, baseline):
            if rival is None:
                continue
            mine, theirs = by_seed(group, *ours), by_seed(group, *rival)
            if not set(mine) & set(theirs):
                continue
            result = paired_difference(mine, theirs, confidence=confidence)
            rows.append({
                **dict(zip(GROUP_KEYS, key, strict=True)),
                "fedsb": f"fedsb r={ours[1]}",
                "rival": rival[0] if rival[0] == HEAD_ONLY else f"{rival[0]} r={rival[1]}",
                "difference": result.describe(), "verdict": result.verdict,
                "gaps": ", ".join(f"s{s}: {g:+.2f}" for s, g in
                                  zip(result.seeds, result.gaps, strict=True)),
            })
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)
