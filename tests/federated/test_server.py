"""Fed-SB aggregation: exactness, order invariance, validation of client replies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from accounting.events import GaussianDpEvent, PoissonSampledDpEvent
from conftest import tiny_bert
from fedsb_dp.adapters import (
    SBConfig,
    find_target_modules,
    frozen_fingerprint,
    inject_adapters,
    random_orthonormal_init,
    sb_layers,
    trainable_state,
)
from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.errors import AdapterMismatchError, ConfigError
from fedsb_dp.federated.client import ClientUpdate, NonFiniteUpdateError
from fedsb_dp.federated.server import payload_bytes, validate_update
from fedsb_dp.methods.mean import weighted_mean


def _model(seed=0):
    model = tiny_bert()
    config = SBConfig(rank=4, target_modules=("query", "value"))
    targets = find_target_modules(model, config.target_modules, rank=4)
    inject_adapters(model, random_orthonormal_init(targets, rank=4, seed=seed).factors, config)
    return model


def _client_states(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = trainable_state(model)
    return [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]


def _delta_ws(model, state):
    set_trainable_state(model, state)
    return {n: layer.get_delta_weight().detach().clone() for n, layer in sb_layers(model).items()}


def test_aggregate_is_exact_in_weight_space():
    model = _model()
    states = _client_states(model, 4)
    weights = [1.0, 2.0, 3.0, 4.0]
    expected = {}
    for state, w in zip(states, weights, strict=True):
        for name, dw in _delta_ws(model, state).items():
            expected[name] = expected.get(name, 0) + (w / 10) * dw
    aggregated = _delta_ws(model, weighted_mean(states, weights))
    for name in expected:
        torch.testing.assert_close(aggregated[name], expected[name], atol=1e-6, rtol=1e-5)


def test_one_client_identity_order_invariance_identical_updates():
    model = _model()
    states = _client_states(model, 3)
    one = weighted_mean(states[:1])
    assert all(torch.equal(one[k], states[0][k]) for k in one)
    forward = weighted_mean(states, [1, 2, 3])
    backward = weighted_mean(states[::-1], [3, 2, 1])
    for k in forward:
        torch.testing.assert_close(forward[k], backward[k], atol=1e-7, rtol=0)
    same = weighted_mean([states[1]] * 5)
    for k in same:
        torch.testing.assert_close(same[k], states[1][k], atol=1e-7, rtol=0)


def test_rounds_do_not_leak_into_each_other():
    model = _model()
    first = weighted_mean(_client_states(model, 3, seed=1))
    second_states = _client_states(model, 2, seed=2)
    second = weighted_mean(second_states)
    alone = weighted_mean(second_states)
    assert all(torch.equal(second[k], alone[k]) for k in second)
    assert not all(torch.equal(first[k], second[k]) for k in first)


def _update(model, state, **changes):
    update = ClientUpdate(
        client_id="c0", state=state, steps=5,
        event=PoissonSampledDpEvent(sampling_probability=0.1,
                                    event=GaussianDpEvent(noise_multiplier=1.0)),
        fingerprint=frozen_fingerprint(model))
    return dataclasses.replace(update, **changes)


def test_reply_validation():
    model = _model()
    global_state = trainable_state(model)
    fp = frozen_fingerprint(model)
    good = _update(model, _client_states(model, 1)[0])
    validate_update(good, global_state=global_state, fingerprint=fp, expected_steps=5)
    other = _model(seed=9)
    with pytest.raises(AdapterMismatchError, match="frozen factors"):
        validate_update(_update(other, good.state, fingerprint=frozen_fingerprint(other)),
                        global_state=global_state, fingerprint=fp, expected_steps=5)
    key = next(iter(good.state))
    missing = {k: v for k, v in good.state.items() if k != key}
    with pytest.raises(ConfigError, match="missing"):
        validate_update(_update(model, missing), global_state=global_state, fingerprint=fp,
                        expected_steps=5)
    wrong_shape = {**good.state, key: torch.zeros(3, 3)}
    with pytest.raises(ConfigError, match=r"\(3, 3\)"):
        validate_update(_update(model, wrong_shape), global_state=global_state,
                        fingerprint=fp, expected_steps=5)
    nan = {**good.state, key: torch.full_like(good.state[key], float("nan"))}
    with pytest.raises(NonFiniteUpdateError, match="non-finite"):
        validate_update(_update(model, nan), global_state=global_state, fingerprint=fp,
                        expected_steps=5)
    # Client-level: the update is not yet a release; the server's clipping zeroes it instead.
    validate_update(_update(model, nan), global_state=global_state, fingerprint=fp,
                    expected_steps=5, finite_required=False)
    with pytest.raises(ConfigError, match="ran 4 steps"):
        validate_update(_update(model, good.state, steps=4), global_state=global_state,
                        fingerprint=fp, expected_steps=5)


def test_payload_is_r_squared_per_layer_plus_head():
    model = _model()
    state = trainable_state(model)
    numbers = sum(v.numel() for v in state.values())
    assert numbers == 4 * 16 + 32 * 2 + 2  # 4 layers × r², head 32×2 + 2
    size = payload_bytes(state)
    assert numbers * 4 <= size < numbers * 4 + 2048  # float32 plus a small header


def test_bad_weights():
    model = _model()
    with pytest.raises(ConfigError, match="weights"):
        weighted_mean(_client_states(model, 2), [1.0, -1.0])
    with pytest.raises(ConfigError, match="zero client updates"):
        weighted_mean([])
