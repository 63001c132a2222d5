"""Client-level aggregation: clipping of whole-client updates, noise, public denominator."""

from __future__ import annotations

import pytest
import torch

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client_level import clipped_noisy_mean, poisson_cohort


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_one_client_moves_the_sum_by_at_most_s():
    global_state = {"a": torch.zeros(3, 3), "b": torch.zeros(4)}
    big = {"a": torch.full((3, 3), 5.0), "b": torch.full((4,), -5.0)}
    small = {"a": torch.full((3, 3), 0.001), "b": torch.zeros(4)}
    with_big = clipped_noisy_mean(global_state, [small, big], clip_norm=0.5,
                                  noise_multiplier=0.0, denominator=1.0, generator=_gen())
    without = clipped_noisy_mean(global_state, [small], clip_norm=0.5, noise_multiplier=0.0,
                                 denominator=1.0, generator=_gen())
    diff = torch.sqrt(sum((with_big[k] - without[k]).pow(2).sum() for k in global_state))
    assert diff == pytest.approx(0.5, rel=1e-5)


def test_public_denominator_and_noise_scale():
    global_state = {"a": torch.ones(20000)}
    same = {"a": torch.ones(20000) + 0.001}
    out = clipped_noisy_mean(global_state, [same], clip_norm=10.0, noise_multiplier=0.0,
                             denominator=4.0, generator=_gen())
    torch.testing.assert_close(out["a"], torch.ones(20000) + 0.001 / 4)
    noisy = clipped_noisy_mean(global_state, [], clip_norm=0.5, noise_multiplier=2.0,
                               denominator=4.0, generator=_gen())
    assert (noisy["a"] - 1).std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)


def test_poisson_cohort():
    ids = [f"c{i}" for i in range(1000)]
    chosen = poisson_cohort(ids, 0.1, _gen(3))
    assert 60 < len(chosen) < 140 and set(chosen) <= set(ids)
    assert poisson_cohort(ids, 1.0, _gen()) == ids
    with pytest.raises(ConfigError, match="participation=0"):
        poisson_cohort(ids, 0, _gen())


def test_a_nonfinite_update_counts_as_zero():
    # Before the server's noise a client's update is private: it may not stop the run.
    global_state = {"a": torch.zeros(3, 3)}
    good = {"a": torch.full((3, 3), 0.01)}
    bad = {"a": torch.full((3, 3), float("nan"))}
    with_bad = clipped_noisy_mean(global_state, [good, bad], clip_norm=1.0, noise_multiplier=0.0,
                                  denominator=2.0, generator=_gen())
    alone = clipped_noisy_mean(global_state, [good], clip_norm=1.0, noise_multiplier=0.0,
                               denominator=2.0, generator=_gen())
    torch.testing.assert_close(with_bad["a"], alone["a"])
