"""The client's DP-SGD step: clipping, normalisation by the public batch size, chunking, empty
Poisson batches, and what it reports."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from accounting.events import GaussianDpEvent, PoissonSampledDpEvent
from conftest import ToyTextDataset as _Toy
from conftest import tiny_bert
from conftest import toy_collate as _collate
from fedsb_dp.adapters import (
    LayerFactors,
    SBConfig,
    find_target_modules,
    inject_adapters,
    random_orthonormal_init,
    trainable_state,
)
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client import (
    DPClient,
    LocalTrainingConfig,
    poisson_indices,
    sampling_probability,
)
from fedsb_dp.losses import example_losses
from fedsb_dp.models import SEQUENCE_CLASSIFICATION as TASK


def _adapted(seed=0):
    model = tiny_bert(seed=seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = SBConfig(rank=4, target_modules=("query", "value"))
    targets = find_target_modules(model, config.target_modules, rank=4)
    init = random_orthonormal_init(targets, rank=4, seed=0)
    g = torch.Generator().manual_seed(5)
    inject_adapters(model, {n: LayerFactors(f.B, 0.1 * torch.randn(4, 4, generator=g), f.A)
                            for n, f in init.factors.items()}, config)
    return model


def _local(**overrides):
    values = dict(expected_batch_size=8, local_steps=1, learning_rate=1.0, optimizer="sgd",
                  max_grad_norm=0.05, noise_multiplier=0.0, max_physical_batch_size=64)
    values.update(overrides)
    return LocalTrainingConfig(**values)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_step_equals_clipped_sum_over_expected_batch_size():
    model = _adapted()
    data = _Toy(16)
    client = DPClient("c", data, _collate, task=TASK)
    start = trainable_state(model)
    # Which records the Poisson draw picks with this generator (q = 8/16).
    seed = next(s for s in range(100) if len(poisson_indices(16, 0.5, _gen(s))) not in (0, 8))
    chosen = poisson_indices(16, 0.5, _gen(seed)).tolist()
    assert 0 < len(chosen) != 8, "realised size must differ from the expected size"
    update = client.train_round(GradSampleModule(model, loss_reduction="mean"), start, _local(),
                                noise_generator=_gen(0), sampling_generator=_gen(seed))
    # Manual: per-example grads, clip to C jointly, sum, divide by b = 8 (not len(chosen)).
    expected = {k: torch.zeros_like(v) for k, v in start.items()}
    params = dict(model.named_parameters())
    for i in chosen:
        from fedsb_dp.adapters.export import set_trainable_state

        set_trainable_state(model, start)
        model.zero_grad(set_to_none=True)
        example_losses(model, _collate([data[i]]), task=TASK).sum().backward()
        grads = {k: params[k].grad.detach().clone() for k in start}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, 0.05 / (norm.item() + 1e-6))
        for k in start:
            expected[k] += factor * grads[k]
    for k in start:
        torch.testing.assert_close(update.state[k], start[k] - expected[k] / 8,
                                   atol=1e-6, rtol=1e-4)
    assert update.steps == 1
    assert update.event == PoissonSampledDpEvent(sampling_probability=0.5,
                                                  event=GaussianDpEvent(noise_multiplier=0.0))


def test_chunking_does_not_change_the_step():
    data = _Toy(16)
    results = []
    for physical in (64, 3):
        model = _adapted()
        client = DPClient("c", data, _collate, task=TASK)
        start = trainable_state(model)
        update = client.train_round(GradSampleModule(model, loss_reduction="mean"), start,
                                    _local(max_physical_batch_size=physical, local_steps=2),
                                    noise_generator=_gen(0), sampling_generator=_gen(1))
        results.append(update.state)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)


def test_chunked_logical_step_draws_noise_once():
    # σ > 0: a logical batch split into physical chunks of 3 must release exactly what the
    # unchunked step releases, from the same noise generator state, and leave that generator
    # where one noise draw per step leaves it. Noise per chunk would change both.
    data = _Toy(16)
    sizes = [len(poisson_indices(16, 0.5, g)) for g in [_gen(1)] for _ in range(2)]
    assert min(sizes) > 3, f"both logical batches must span several chunks, got {sizes}"
    results = []
    for physical in (64, 3):
        model = _adapted()
        noise = _gen(7)
        update = DPClient("c", data, _collate, task=TASK).train_round(
            GradSampleModule(model, loss_reduction="mean"), trainable_state(model),
            _local(max_physical_batch_size=physical, local_steps=2, noise_multiplier=1.0),
            noise_generator=noise, sampling_generator=_gen(1))
        results.append((update.state, noise.get_state()))
    (whole, whole_noise), (chunked, chunked_noise) = results
    assert torch.equal(whole_noise, chunked_noise), "chunking changed how much noise was drawn"
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], atol=1e-6, rtol=1e-5)


def test_poisson_inclusion_is_drawn_and_compared_in_float64():
    # The sampler's draws are float64 uniforms compared with q in float64: the same indices as
    # that reference stream. float32 draws differ from it, and lose q near float32 rounding:
    # 1 − 2⁻³⁰ rounds to 1 and 1e-50 to 0.
    for q in (0.3, 2 ** -30, 1 - 2 ** -30, 1e-50):
        reference = torch.rand(4096, generator=_gen(11), dtype=torch.float64)
        expected = torch.nonzero(reference < q).flatten()
        assert torch.equal(poisson_indices(4096, q, _gen(11)), expected)
    assert torch.tensor(1 - 2 ** -30, dtype=torch.float32).item() == 1.0  # why it matters
    assert torch.tensor(1e-50, dtype=torch.float32).item() == 0.0


def test_empty_poisson_batches_still_step_and_release_noise():
    model = _adapted()
    data = _Toy(400)
    client = DPClient("c", data, _collate, task=TASK)
    start = trainable_state(model)
    # q = 1/400 with 3 steps: with this generator every batch is empty.
    def draws(seed):
        sampler = _gen(seed)
        return [len(poisson_indices(400, 1 / 400, sampler)) for _ in range(3)]

    seed = next(s for s in range(1000) if draws(s) == [0, 0, 0])
    update = client.train_round(
        GradSampleModule(model, loss_reduction="mean"), start,
        _local(expected_batch_size=1, local_steps=3, noise_multiplier=1.0),
        noise_generator=_gen(0), sampling_generator=_gen(seed))
    assert update.steps == 3
    moved = torch.cat([(update.state[k] - start[k]).flatten() for k in start])
    # Pure noise: 3 steps of N(0, (σC/b)²) = N(0, 0.05²) per coordinate, lr 1.
    assert moved.std().item() == pytest.approx(0.05 * 3 ** 0.5, rel=0.15)


def test_noise_scale_matches_sigma_c_over_b():
    model = _adapted()
    data = _Toy(32)
    client = DPClient("c", data, _collate, task=TASK)
    start = trainable_state(model)
    clean = client.train_round(GradSampleModule(model, loss_reduction="mean"), start,
                               _local(noise_multiplier=0.0), noise_generator=_gen(0),
                               sampling_generator=_gen(4))
    model2 = _adapted()
    noisy = DPClient("c", data, _collate, task=TASK).train_round(
        GradSampleModule(model2, loss_reduction="mean"), start, _local(noise_multiplier=4.0),
        noise_generator=_gen(9), sampling_generator=_gen(4))
    diff = torch.cat([(noisy.state[k] - clean.state[k]).flatten() for k in start])
    assert diff.std().item() == pytest.approx(4.0 * 0.05 / 8, rel=0.1)


def test_frozen_tensors_unchanged_and_fingerprint_reported():
    from fedsb_dp.adapters import frozen_fingerprint

    model = _adapted()
    before = frozen_fingerprint(model, scope="all")
    update = DPClient("c", _Toy(16), _collate, task=TASK).train_round(
        GradSampleModule(model, loss_reduction="mean"), trainable_state(model),
        _local(noise_multiplier=1.0), noise_generator=_gen(0), sampling_generator=_gen(1))
    assert frozen_fingerprint(model, scope="all") == before
    assert update.fingerprint == frozen_fingerprint(model)


def test_bad_local_settings():
    with pytest.raises(ConfigError, match="expected batch size 20 exceeds"):
        sampling_probability(20, 10)
    with pytest.raises(ConfigError, match="local_steps=0"):
        _local(local_steps=0)
    with pytest.raises(ConfigError, match="optimizer='adam'"):
        _local(optimizer="adam")
    with pytest.raises(ConfigError, match="has no records"):
        DPClient("empty", _Toy(0), _collate, task=TASK)
