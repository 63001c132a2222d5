"""The gradient-SVD initialiser in its three data-source modes, and what each costs."""

from __future__ import annotations

import pytest
import torch

from accounting.events import GaussianDpEvent, NonPrivateDpEvent, NoOpDpEvent
from conftest import ToyTextDataset as _Toy
from conftest import tiny_bert
from conftest import toy_collate as _collate
from fedsb_dp.adapters import find_target_modules, gradient_svd_init
from fedsb_dp.adapters.initializers import (
    clipped_gradient_sum,
    dp_gradient_sum,
    factors_from_gradients,
    raw_gradient_sum,
)
from fedsb_dp.errors import ConfigError

TASK = "sequence-classification"


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
    clipped = clipped_gradient_sum(model, targets, data, _collate, task=TASK, n_init=20,
                                   max_grad_norm=0.05, batch_size=7)
    noisy, event = dp_gradient_sum(model, targets, data, _collate, task=TASK, n_init=20,
                                   max_grad_norm=0.05, noise_multiplier=0.0, batch_size=5,
                                   allow_nonprivate=True)
    assert event == NonPrivateDpEvent()
    for name in targets:
        torch.testing.assert_close(noisy[name], clipped[name], atol=1e-6, rtol=1e-5)
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
    raw = raw_gradient_sum(model, targets, data, _collate, task=TASK, n_init=9, batch_size=4)
    clipped = clipped_gradient_sum(model, targets, data, _collate, task=TASK, n_init=9,
                                   max_grad_norm=1e9, batch_size=3)
    for name in targets:
        torch.testing.assert_close(clipped[name], raw[name], atol=1e-6, rtol=1e-4)


def test_one_record_changes_pre_noise_sum_by_at_most_c():
    model = _model()
    targets = find_target_modules(model, ("query", "value"), rank=4)
    data = _Toy(12)
    c = 0.001
    with_all = clipped_gradient_sum(model, targets, data, _collate, task=TASK, n_init=12,
                                    max_grad_norm=c, batch_size=4)
    without_last = clipped_gradient_sum(model, targets, data, _collate, task=TASK, n_init=11,
                                        max_grad_norm=c, batch_size=4)
    diff = torch.sqrt(sum((with_all[n] - without_last[n]).pow(2).sum() for n in targets))
    raw_last = raw_gradient_sum(model, targets, torch.utils.data.Subset(data, [11]), _collate,
                                task=TASK, n_init=1)
    raw_norm = torch.sqrt(sum(raw_last[n].pow(2).sum() for n in targets))
    assert raw_norm > 2 * c, "the record must actually be clipped for this test to bite"
    assert diff <= c * (1 + 1e-4)
    assert diff >= c * 0.99  # clipped to the bound, not vanished


def test_dp_init_event_and_noise_scale():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    data = _Toy(6)
    clipped = clipped_gradient_sum(model, targets, data, _collate, task=TASK, n_init=6,
                                   max_grad_norm=0.1)
    noisy, event = dp_gradient_sum(model, targets, data, _collate, task=TASK, n_init=6,
                                   max_grad_norm=0.1, noise_multiplier=2.0)
    assert event == GaussianDpEvent(noise_multiplier=2.0)
    residual = torch.cat([(noisy[n] - clipped[n]).flatten() for n in targets])
    # 1024 coordinates of N(0, (σC)²) = N(0, 0.04): the sample std is within a few % of 0.2.
    assert residual.std().item() == pytest.approx(0.2, rel=0.1)


def test_init_events_and_charges():
    model = _model()
    targets = find_target_modules(model, ("query",), rank=4)
    datasets = {"a": _Toy(5, 1), "b": _Toy(5, 2)}
    public = gradient_svd_init(model, targets, {"wiki": _Toy(5, 3)}, _collate, task=TASK,
                               rank=4, source="public", n_init=5)
    assert public.event == NoOpDpEvent() and public.examples_used == {}
    dp = gradient_svd_init(model, targets, datasets, _collate, task=TASK, rank=4, source="dp",
                           n_init=4, max_grad_norm=0.1, noise_multiplier=1.0)
    assert dp.event == GaussianDpEvent(noise_multiplier=1.0)
    assert dp.examples_used == {"a": 4, "b": 4}
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
        dp_gradient_sum(model, targets, _Toy(4), _collate, task=TASK, n_init=4,
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
    dp_gradient_sum(model, targets, _Toy(4), _collate, task=TASK, n_init=4,
                    max_grad_norm=1.0, noise_multiplier=1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
        assert not hasattr(p, "grad_sample") or p.grad_sample is None
