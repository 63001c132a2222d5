"""The gradient-SVD initialiser in its three data-source modes, and what each costs.

The DP mode's sensitivity is tested directly: neighbouring datasets (one record added or
removed anywhere) move the pre-noise statistic by at most C_init.
"""

from __future__ import annotations

import pytest
import torch

from accounting.events import (
    GaussianDpEvent,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
)
from conftest import ToyTextDataset as _Toy
from conftest import tiny_bert
from conftest import toy_collate as _collate
from fedsb_dp.adapters import find_target_modules, gradient_svd_init
from fedsb_dp.adapters.initializers import (
    clipped_gradient_sum,
    dp_gradient_sum,
    factors_from_gradients,
    init_sampling_probability,
    poisson_included,
    raw_gradient_sum,
    sampled_clipped_sum,
)
from fedsb_dp.errors import ConfigError
from fedsb_dp.models import SEQUENCE_CLASSIFICATION as TASK


def _model():
    model = tiny_bert()
    for module in model.modules():  # deterministic gradients for exact comparisons
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_dp_init_with_zero_noise_equals_clipped_nonprivate():
    model = _model()
    targets = find_target_modules(model, ("query", "value"), rank=4)
    data = _Toy(20)
    clipped = clipped_gradient_sum(model, targets, data, _collate, task=TASK,
                                   indices=range(20), max_grad_norm=0.05, batch_size=7)
    # n_init = N: q_init = 1, every record is in the sample; the sum is divided by n_init.
    noisy, event = dp_gradient_sum(model, targets, data, _collate, task=TASK,
                                   expected_examples=20, max_grad_norm=0.05,
                                   noise_multiplier=0.0, batch_size=5, allow_nonprivate=True)
    assert event == NonPrivateDpEvent()
    for name in targets:
        torch.testing.assert_close(noisy[name], clipped[name] / 20, atol=1e-7, rtol=1e-5)
    via_init = gradient_svd_init(model, targets, {"c0": data}, _collate, task=TASK, rank=4,
                                 source="dp", n_init=20, max_grad_norm=0.05,
                                 noise_multiplier=0.0, allow_nonprivate=True)
    expected = factors_from_gradients(clipped, rank=4, lr_eff=5e-4)
    for name in targets:
        torch.testing.assert_close(via_init.factors[name].R, expected[name].R)
    assert via_init.event == NonPrivateDpEvent()


def test_clipping_off_when_clip_is_huge_matches_raw_sum():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    data = _Toy(9)
    raw = raw_gradient_sum(model, targets, data, _collate, task=TASK, indices=range(9),
                           batch_size=4)
    clipped = clipped_gradient_sum(model, targets, data, _collate, task=TASK, indices=range(9),
                                   max_grad_norm=1e9, batch_size=3)
    for name in targets:
        torch.testing.assert_close(clipped[name], raw[name], atol=1e-6, rtol=1e-4)


class _Rows(torch.utils.data.Dataset):
    """Some rows of a dataset, in the given order (a neighbouring dataset)."""

    def __init__(self, base: torch.utils.data.Dataset, rows: list[int]) -> None:
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.base[self.rows[i]]


def _norm(a, b, names) -> float:
    return float(torch.sqrt(sum((a[n] - b[n]).pow(2).sum() for n in names)))


# One removed (or added) record at the start, inside the first n_init, at n_init, and last.
@pytest.mark.parametrize("changed", [0, 3, 6, 15])
def test_pre_noise_init_statistic_moves_by_at_most_c_for_neighbours(changed):
    """Sensitivity C_init under add/remove of one record anywhere in the client's data.

    The shared records keep their inclusion draws; the changed record is drawn into the
    sample (draw 0), so the difference is its clipped gradient, never a second record.
    """
    model = _model()
    targets = find_target_modules(model, ("query", "value"), rank=4)
    base = _Toy(16, seed=5)
    c, n_init = 1e-3, 6
    q = n_init / 16
    draws = torch.rand(16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    draws[changed] = 0.0  # the changed record is in D's sample
    rows = list(range(16))
    without = [r for r in rows if r != changed]
    stat = sampled_clipped_sum(model, targets, base, _collate, task=TASK, draws=draws,
                               sampling_probability=q, max_grad_norm=c, batch_size=4)
    # Removal: D' = D minus the record; the others keep their draws.
    removed = sampled_clipped_sum(model, targets, _Rows(base, without), _collate, task=TASK,
                                  draws=draws[without], sampling_probability=q,
                                  max_grad_norm=c, batch_size=4)
    raw = raw_gradient_sum(model, targets, base, _collate, task=TASK, indices=[changed])
    assert torch.sqrt(sum(raw[n].pow(2).sum() for n in targets)) > 2 * c, \
        "the record must actually be clipped for this test to bite"
    distance = _norm(stat, removed, targets)
    assert distance <= c * (1 + 1e-4)
    assert distance >= c * 0.99  # the record counted, clipped to the bound
    # Addition: the record appended at the end of D' with a draw that includes it.
    added = sampled_clipped_sum(model, targets, _Rows(base, [*without, changed]), _collate,
                                task=TASK, draws=torch.cat([draws[without], draws[[changed]]]),
                                sampling_probability=q, max_grad_norm=c, batch_size=4)
    assert _norm(added, removed, targets) <= c * (1 + 1e-4)


def test_init_sample_is_poisson_at_n_init_over_n():
    draws = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    included = poisson_included(draws, 0.05)
    assert abs(len(included) - 1000) < 4 * (20_000 * 0.05 * 0.95) ** 0.5
    assert included == sorted(included) and included[0] > 0  # not the first records


def test_inclusion_is_compared_in_float64():
    # Just below q in float64, but rounds up to float32(q) in single precision.
    draws = torch.tensor([0.1 - 1e-11, 0.1, 0.1 + 1e-11], dtype=torch.float64)
    assert poisson_included(draws, 0.1) == [0]


def test_q_init_above_one_is_refused_with_size_and_flag():
    with pytest.raises(ConfigError, match=r"init_examples=64 exceeds the 40 records of "
                                          r"client-2.*--init-examples"):
        init_sampling_probability(64, 40, client_id="client-2")
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    with pytest.raises(ConfigError, match="exceeds the 3 records of small"):
        gradient_svd_init(model, targets, {"big": _Toy(10), "small": _Toy(3)}, _collate,
                          task=TASK, rank=4, source="dp", n_init=4, max_grad_norm=0.1,
                          noise_multiplier=1.0)


def test_dp_init_event_and_noise_scale():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    data = _Toy(6)
    clipped = clipped_gradient_sum(model, targets, data, _collate, task=TASK,
                                   indices=range(6), max_grad_norm=0.1)
    noisy, event = dp_gradient_sum(model, targets, data, _collate, task=TASK,
                                   expected_examples=6, max_grad_norm=0.1, noise_multiplier=2.0)
    assert event == PoissonSampledDpEvent(1.0, GaussianDpEvent(noise_multiplier=2.0))
    residual = torch.cat([(noisy[n] - clipped[n] / 6).flatten() for n in targets])
    # 1024 coordinates of N(0, (σC/n_init)²): the sample std is within a few % of 0.2 / 6.
    assert residual.std().item() == pytest.approx(0.2 / 6, rel=0.1)


def test_init_events_and_charges():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    datasets = {"a": _Toy(5, 1), "b": _Toy(8, 2)}
    public = gradient_svd_init(model, targets, {"wiki": _Toy(5, 3)}, _collate, task=TASK,
                               rank=4, source="public", n_init=5)
    assert public.event == NoOpDpEvent() and public.examples_used == {} and not public.events
    dp = gradient_svd_init(model, targets, datasets, _collate, task=TASK, rank=4, source="dp",
                           n_init=4, max_grad_norm=0.1, noise_multiplier=1.0)
    # Each client's rate is its own: n_init / N_i, never a min over clients.
    assert dp.events == {"a": PoissonSampledDpEvent(4 / 5, GaussianDpEvent(1.0)),
                         "b": PoissonSampledDpEvent(4 / 8, GaussianDpEvent(1.0))}
    assert dp.examples_used == {"a": 4, "b": 4}  # expected counts, never the realised ones
    nonpriv = gradient_svd_init(model, targets, datasets, _collate, task=TASK, rank=4,
                                source="nonprivate", n_init=4, allow_nonprivate=True)
    assert nonpriv.event == NonPrivateDpEvent()
    for f in dp.factors.values():
        torch.testing.assert_close(f.B.T @ f.B, torch.eye(4), atol=1e-6, rtol=0)
        assert torch.all(torch.diagonal(f.R) > 0)


def test_nonprivate_needs_explicit_flag():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    with pytest.raises(ConfigError, match="allow_nonprivate"):
        gradient_svd_init(model, targets, {"a": _Toy(4)}, _collate, task=TASK, rank=4,
                          source="nonprivate", n_init=4)
    with pytest.raises(ConfigError, match="noise_multiplier=0"):
        dp_gradient_sum(model, targets, _Toy(4), _collate, task=TASK, expected_examples=4,
                        max_grad_norm=1.0, noise_multiplier=0.0)


@pytest.mark.parametrize("n_init", [0, -3])
def test_bad_n_init(n_init):
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    with pytest.raises(ConfigError, match=f"n_init={n_init}"):
        gradient_svd_init(model, targets, {"a": _Toy(4)}, _collate, task=TASK, rank=4,
                          source="public", n_init=n_init)


def test_unknown_source():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    with pytest.raises(ConfigError, match="source='raw'"):
        gradient_svd_init(model, targets, {"a": _Toy(4)}, _collate, task=TASK, rank=4,
                          source="raw", n_init=2)


def test_init_leaves_model_state_untouched():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    targets = find_target_modules(model, ("query",), rank=4)
    dp_gradient_sum(model, targets, _Toy(4), _collate, task=TASK, expected_examples=4,
                    max_grad_norm=1.0, noise_multiplier=1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
        assert not hasattr(p, "grad_sample") or p.grad_sample is None
