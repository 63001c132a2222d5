"""Aggregator conformance suite: one interface, the same properties for every method.

Exactness means: the global model's effective weights W0 + ΔW after aggregation equal the
weighted mean of the clients' effective weights. Fed-SB, FFA-LoRA, FedEx-LoRA, FLoRA, FedSVD
and RoLoRA (here in its first round, B; its A rounds in test_fedsvd_rolora.py) must be exact;
FedIT must be shown not to be.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_bert
from fedsb_dp.adapters import (
    find_target_modules,
    frozen_fingerprint,
    random_orthonormal_init,
    trainable_state,
)
from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.adapters.lora import LoRALinear, lora_layers
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods import (
    METHODS,
    FedSB,
    adapted_layers,
    effective_weights,
    method_class,
    pad_state,
    set_active_rank,
    truncate_state,
)
from fedsb_dp.methods.head_only import HeadOnly

FEDERATED = ["fedsb", "fedit", "ffa-lora", "fedex-lora", "flora", "fedsvd", "rolora", "head-only"]
EXACT = ["fedsb", "ffa-lora", "fedex-lora", "flora", "fedsvd", "rolora", "head-only"]
RANK = 4


def _model(name: str, seed: int = 0):
    model = tiny_bert().double()  # float64: exactness checked to 1e-10, not float32 noise
    cls, _ = method_class(name)
    method = cls(rank=RANK, scaling=2.0)
    targets = find_target_modules(model, ("query", "value"), rank=RANK)
    factors = random_orthonormal_init(targets, rank=RANK, seed=seed).factors
    method.inject(model, targets, generator=torch.Generator().manual_seed(seed), factors=factors)
    method.begin_round(model, 0)  # RoLoRA's first round trains B; a no-op for the others
    return model, method


def _client_states(model, count: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    start = trainable_state(model)
    return [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
             for k, v in start.items()} for _ in range(count)]


def _aggregate_weights(model, method, states, weights=None, seed=7):
    server = copy.deepcopy(model)
    start = trainable_state(server)
    result = method.aggregate(server, start, states, weights,
                              generator=torch.Generator().manual_seed(seed))
    method.apply(server, result)
    return server, result


def _model_weights(model):
    """Every weight the model computes with: adapted layers' W0 + ΔW and the trained head.

    The head is included so that head-only, which has no adapted layer, is checked too.
    """
    out = effective_weights(model)
    out.update({f"trained:{k}": v for k, v in trainable_state(model).items()
                if "classifier" in k})
    return out


def _max_error(server, states, weights, model):
    total = float(sum(weights))
    expected = {}
    for state, w in zip(states, weights, strict=True):
        clone = copy.deepcopy(model)
        set_trainable_state(clone, state)
        for name, W in _model_weights(clone).items():
            expected[name] = expected.get(name, 0) + (w / total) * W
    actual = _model_weights(server)
    assert set(actual) == set(expected) and actual
    return max((actual[n] - expected[n]).abs().max().item() for n in expected)


@pytest.mark.parametrize("name", EXACT)
def test_exact_methods_average_the_clients_models(name):
    model, method = _model(name)
    states = _client_states(model, 3)
    weights = [1.0, 2.0, 5.0]
    server, _ = _aggregate_weights(model, method, states, weights)
    assert _max_error(server, states, weights, model) < 1e-10


def test_fedit_is_inexact():
    model, method = _model("fedit")
    states = _client_states(model, 3)
    server, _ = _aggregate_weights(model, method, states, [1.0, 1.0, 1.0])
    # mean(B)·mean(A) misses the cross terms: the error is of the size of the products.
    assert _max_error(server, states, [1.0, 1.0, 1.0], model) > 1e-3


@pytest.mark.parametrize("name", FEDERATED)
def test_one_client_is_the_identity(name):
    model, method = _model(name)
    (state,) = _client_states(model, 1)
    server, _ = _aggregate_weights(model, method, [state])
    assert _max_error(server, [state], [1.0], model) < 1e-10
    head = [k for k in state if "classifier" in k]
    assert head
    for key in head:
        torch.testing.assert_close(trainable_state(server)[key], state[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", FEDERATED)
def test_client_order_does_not_matter(name):
    model, method = _model(name)
    states = _client_states(model, 3)
    weights = [1.0, 2.0, 3.0]
    first, _ = _aggregate_weights(model, method, states, weights)
    second, _ = _aggregate_weights(model, method, states[::-1], weights[::-1])
    a, b = _model_weights(first), _model_weights(second)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FEDERATED)
def test_identical_updates_give_that_update(name):
    model, method = _model(name)
    (state,) = _client_states(model, 1)
    server, _ = _aggregate_weights(model, method, [state, state, state])
    assert _max_error(server, [state], [1.0], model) < 1e-10


@pytest.mark.parametrize("name", FEDERATED)
def test_a_fresh_buffer_every_round(name):
    """Aggregating the same replies twice (two rounds) gives the same result both times."""
    model, method = _model(name)
    states = _client_states(model, 2)
    start = trainable_state(model)
    one = method.aggregate(model, start, states, generator=torch.Generator().manual_seed(0))
    two = method.aggregate(model, start, states, generator=torch.Generator().manual_seed(0))
    for key in one.state:
        assert torch.equal(one.state[key], two.state[key])


def test_trainable_sets_by_method():
    expectations = {
        "fedsb": {"R.weight"},
        "fedit": {"lora_A.weight", "lora_B.weight"},
        "ffa-lora": {"lora_B.weight"},
        "fedex-lora": {"lora_A.weight", "lora_B.weight"},
        "flora": {"lora_A.weight", "lora_B.weight"},
        "head-only": set(),
        "fedsvd": {"lora_B.weight"},
        "rolora": {"lora_B.weight"},  # round 1; round 2 trains A (test_rolora_methods)
    }
    for name, kinds in expectations.items():
        model, _ = _model(name)
        adapter = {k.split(".", 4)[-1].split("value.")[-1].split("query.")[-1]
                   for k in trainable_state(model) if "classifier" not in k}
        assert adapter == kinds, name
        assert all(not p.requires_grad for n, p in model.named_parameters()
                   if "base_layer" in n or "embeddings" in n)


def test_ffa_layers_get_distinct_frozen_A():
    model, _ = _model("ffa-lora")
    As = [layer.lora_A.weight for layer in lora_layers(model).values()]
    assert len(As) == 4
    assert all(not a.requires_grad for a in As)
    for i in range(len(As)):
        for j in range(i + 1, len(As)):
            assert not torch.equal(As[i], As[j])


def test_fedex_residual_is_in_the_downlink_and_grows_with_clients():
    model, method = _model("fedex-lora")
    sizes = []
    for count in (2, 4):
        _, result = _aggregate_weights(model, method, _client_states(model, count))
        assert any("residual" in k for k in result.downlink)
        sizes.append(sum(t.numel() for t in result.downlink.values()))
    assert sizes[1] > sizes[0]
    fedsb, fedsb_method = _model("fedsb")
    sb_sizes = [sum(t.numel() for t in _aggregate_weights(
        fedsb, fedsb_method, _client_states(fedsb, count))[1].downlink.values())
        for count in (2, 4)]
    assert sb_sizes[0] == sb_sizes[1]


def test_flora_restarts_adapters_and_merges_into_the_base():
    model, method = _model("flora")
    states = _client_states(model, 3)
    server, result = _aggregate_weights(model, method, states)
    for layer in lora_layers(server).values():
        assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert set(result.base_updates) == set(lora_layers(server))
    stack_cols = {k: v.shape for k, v in result.downlink.items() if k.endswith("stack_B")}
    assert all(shape[1] == 3 * RANK for shape in stack_cols.values())


def test_rank_heterogeneous_fedsb_is_exact():
    model, method = _model("fedsb")
    ranks = [1, 2, RANK]
    states = _client_states(model, 3)
    sent = [truncate_state(s, r) for s, r in zip(states, ranks, strict=True)]
    # What each client's model computes: only its leading r_i directions.
    expected = {}
    for state, r in zip(states, ranks, strict=True):
        clone = copy.deepcopy(model)
        set_trainable_state(clone, state)
        set_active_rank(clone, r)
        for name, W in effective_weights(clone).items():
            expected[name] = expected.get(name, 0) + W / 3
    server = copy.deepcopy(model)
    result = method.aggregate(server, trainable_state(server), sent)
    method.apply(server, result)
    actual = effective_weights(server)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-10)
    assert all(v.shape == (RANK, RANK) for k, v in result.state.items() if k.endswith("R.weight"))


def test_rank_heterogeneous_forward_uses_only_the_leading_block():
    model, _ = _model("fedsb")
    layer = next(m for m in model.modules() if hasattr(m, "active_rank"))
    x = torch.randn(5, layer.base_layer.in_features, dtype=torch.float64)
    set_active_rank(model, 2)
    before = layer(x)
    with torch.no_grad():
        layer.R.weight[2:, :] += 1.0
        layer.R.weight[:, 2:] += 1.0
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    with torch.no_grad():
        layer.R.weight[0, 1] += 1.0
    assert not torch.allclose(layer(x), before)


def test_heterogeneous_ranks_above_the_global_rank_are_refused():
    model, _ = _model("fedsb")
    with pytest.raises(ConfigError, match="client rank 5"):
        set_active_rank(model, RANK + 1)
    with pytest.raises(ConfigError, match="exceeds the global rank"):
        truncate_state(trainable_state(model), RANK + 1)
    big = {k: (torch.zeros(RANK + 1, RANK + 1) if k.endswith("R.weight") else v)
           for k, v in trainable_state(model).items()}
    with pytest.raises(ConfigError, match="cannot be padded"):
        pad_state(big, trainable_state(model))


def test_head_only_trains_the_head_and_nothing_else():
    model, method = _model("head-only")
    assert adapted_layers(model) == {}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"classifier.weight", "classifier.bias"}
    assert method.setup_payload(model) == {}  # nothing to broadcast before round 1
    states = _client_states(model, 3)
    server, result = _aggregate_weights(model, method, states)
    assert set(result.downlink) == trained and not result.base_updates
    # The rest of the model is untouched by aggregation.
    assert frozen_fingerprint(server, scope="all") == frozen_fingerprint(model, scope="all")


def test_head_only_refuses_a_frozen_head():
    with pytest.raises(ConfigError, match="needs train_head=True"):
        HeadOnly(rank=RANK, train_head=False)


def test_unknown_method_is_named():
    with pytest.raises(ConfigError, match="'fedavg' is not one of"):
        method_class("fedavg")
    assert set(METHODS) >= {"fedsb", "fedit", "ffa-lora", "fedex-lora", "flora",
                            "central-lora", "central-sb", "head-only"}


def test_fedsb_refuses_missing_factors():
    model = tiny_bert()
    targets = find_target_modules(model, ("query",), rank=2)
    with pytest.raises(ConfigError, match="needs factors"):
        FedSB(rank=2).inject(model, targets, generator=torch.Generator())


def test_lora_forward_matches_effective_weight():
    model, _ = _model("fedit")
    layer = next(iter(lora_layers(model).values()))
    assert isinstance(layer, LoRALinear)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, layer.base_layer.in_features, dtype=torch.float64)
    expected = x @ layer.effective_weight().T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
