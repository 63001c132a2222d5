"""The paired-difference statistic of sweep reports, on numbers worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedsb_dp.errors import ConfigError
from fedsb_dp.sweep.paired import (
    AHEAD,
    BEHIND,
    TOO_FEW,
    UNDECIDED,
    paired_difference,
    paired_table,
)

T_975_2 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5 % quantile (tables)


def test_interval_matches_the_hand_computed_t_interval():
    # gaps 1, 2, 3 points: mean 2, s = 1, half-width 4.3027 · 1/√3 = 2.4841
    result = paired_difference({0: 0.71, 1: 0.72, 2: 0.73}, {0: 0.70, 1: 0.70, 2: 0.70})
    assert result.seeds == (0, 1, 2)
    assert result.gaps == pytest.approx((1.0, 2.0, 3.0))
    assert result.mean == pytest.approx(2.0)
    assert result.low == pytest.approx(2.0 - T_975_2 / math.sqrt(3))
    assert result.high == pytest.approx(2.0 + T_975_2 / math.sqrt(3))
    assert result.verdict == UNDECIDED  # [−0.48, +4.48] contains 0
    assert result.describe() == "+2.00 [-0.48, +4.48] (n=3)"


def test_verdicts_only_when_the_interval_excludes_zero():
    theirs = {0: 0.5, 1: 0.5, 2: 0.5}
    assert paired_difference({0: 0.52, 1: 0.53, 2: 0.54}, theirs).verdict == AHEAD  # [0.5, 5.5]
    assert paired_difference({0: 0.48, 1: 0.47, 2: 0.46}, theirs).verdict == BEHIND
    assert paired_difference({0: 0.6, 1: 0.4, 2: 0.55}, theirs).verdict == UNDECIDED
    one = paired_difference({0: 0.9}, {0: 0.1})
    assert one.verdict == TOO_FEW and one.low is None and one.describe() == "+80.00 (n=1)"


def test_pairs_by_seed_not_by_position():
    # Same values, listed in a different order on each side, plus unshared seeds.
    ours = {2: 0.60, 0: 0.80, 1: 0.50, 9: 0.99}
    theirs = {0: 0.78, 1: 0.47, 2: 0.58, 5: 0.10}
    result = paired_difference(ours, theirs)
    assert result.seeds == (0, 1, 2)
    assert result.gaps == pytest.approx((2.0, 3.0, 2.0))
    # Unpaired, the spread between splits (0.5 vs 0.8) would swamp a 2-point gap; paired, the
    # interval [0.90, 3.77] excludes 0.
    assert result.verdict == AHEAD


def test_a_wider_confidence_gives_a_wider_interval():
    ours, theirs = {0: 0.52, 1: 0.53, 2: 0.54}, {0: 0.5, 1: 0.5, 2: 0.5}
    narrow = paired_difference(ours, theirs, confidence=0.8)
    wide = paired_difference(ours, theirs, confidence=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high
    assert wide.verdict == UNDECIDED  # t(0.995, 2) = 9.92: [−2.7, 8.7]


def test_bad_inputs():
    with pytest.raises(ConfigError, match="confidence=1.5 must be in"):
        paired_difference({0: 1.0}, {0: 1.0}, confidence=1.5)
    with pytest.raises(ConfigError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_table_pairs_fedsb_with_head_only_and_the_best_adapter_baseline():
    rows = []
    for seed, (sb, head, ffa, fedit) in enumerate([(0.72, 0.70, 0.69, 0.60),
                                                  (0.74, 0.71, 0.70, 0.61),
                                                  (0.73, 0.705, 0.72, 0.62)]):
        for method, acc in (("fedsb", sb), ("head-only", head), ("ffa-lora", ffa),
                            ("fedit", fedit), ("central-lora", 0.99)):
            rows.append(dict(method=method, rank=16, seed=seed, test_accuracy=acc,
                             partition="iid", target_epsilon=3.0, num_clients=3))
    table = paired_table(pd.DataFrame(rows))  # no dataset column: the default dataset
    assert list(table["rival"]) == ["head-only", "ffa-lora r=16"]
    assert set(table["dataset"]) == {"rotten-tomatoes"}
    head, ffa = table.iloc[0], table.iloc[1]
    assert head["gaps"] == "s0: +2.00, s1: +3.00, s2: +2.50" and head["verdict"] == AHEAD
    assert ffa["gaps"] == "s0: +3.00, s1: +4.00, s2: +1.00" and ffa["verdict"] == UNDECIDED
