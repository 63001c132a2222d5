"""FedSVD's re-factorisation and RoLoRA's alternation (the shared properties are in
test_methods.py, which runs both methods through the same conformance suite)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_methods import RANK, _aggregate_weights, _client_states, _max_error, _model

from conftest import tiny_bert
from fedsb_dp.adapters import find_target_modules, random_orthonormal_init, trainable_state
from fedsb_dp.adapters.inject import frozen_fingerprint, train_only
from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods import method_class
from fedsb_dp.methods.fedsvd import refactorise
from fedsb_dp.methods.rolora import trained_factor


def _row_gram_error(A: torch.Tensor) -> float:
    return float((A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)).abs().max())


def test_fedsvd_keeps_A_orthonormal_and_the_product_through_rounds():
    model, method = _model("fedsvd")
    for layer in lora_layers(model).values():
        assert _row_gram_error(layer.lora_A.weight) < 1e-12
    for round_index in range(3):
        states = _client_states(model, 3, seed=round_index + 1)
        B_bar = {k: sum(s[k] for s in states) / 3 for k in states[0]}
        before = {n: (B_bar[f"{n}.lora_B.weight"] @ layer.lora_A.weight).detach()
                  for n, layer in lora_layers(model).items()}
        model, result = _aggregate_weights(model, method, states, [1.0, 1.0, 1.0])
        for name, layer in lora_layers(model).items():
            A = layer.lora_A.weight
            assert not A.requires_grad
            assert _row_gram_error(A) < 1e-12, (round_index, name)
            product = (layer.lora_B.weight @ A).detach()
            assert float((product - before[name]).abs().max()) < 1e-10, (round_index, name)
            assert torch.equal(result.downlink[f"{name}.lora_A.weight"], A.detach())


def test_fedsvd_refactorisation_orders_singular_directions():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.linalg.qr(
        torch.randn(8, 3, generator=g, dtype=torch.float64))[0].T
    B_new, A_new = refactorise(B, A, 3)
    torch.testing.assert_close(B_new @ A_new, B @ A, rtol=0, atol=1e-12)
    norms = B_new.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:])  # columns of UΣ: σ₁ ≥ σ₂ ≥ σ₃


def test_fedsvd_sends_and_checkpoints_the_new_A():
    model, method = _model("fedsvd")
    server, result = _aggregate_weights(model, method, _client_states(model, 2))
    assert frozen_fingerprint(server) != frozen_fingerprint(model)  # A moved: nodes must know
    shared = method.shared_base(server)
    assert set(shared) == {f"{n}.lora_A.weight" for n in lora_layers(server)}
    saved = method.checkpoint_tensors(server)
    fresh = copy.deepcopy(model)
    method.restore(fresh, saved)
    assert frozen_fingerprint(fresh) == frozen_fingerprint(server)
    for key, value in trainable_state(server).items():
        assert torch.equal(trainable_state(fresh)[key], value)
    assert set(result.downlink) >= set(shared)


def test_rolora_alternates_B_then_A():
    assert [trained_factor(t) for t in range(4)] == ["lora_B", "lora_A", "lora_B", "lora_A"]
    with pytest.raises(ValueError, match="round_index=-1"):
        trained_factor(-1)
    model, method = _model("rolora")  # begun at round 0
    for t, trained, frozen in ((0, "lora_B", "lora_A"), (1, "lora_A", "lora_B")):
        method.begin_round(model, t)
        for layer in lora_layers(model).values():
            assert getattr(layer, trained).weight.requires_grad
            assert not getattr(layer, frozen).weight.requires_grad
        assert set(method.shared_base(model)) == {f"{n}.{frozen}.weight"
                                                  for n in lora_layers(model)}
        assert all(f".{frozen}." not in k for k in trainable_state(model))
    method.end_round(model)
    assert all(layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
               for layer in lora_layers(model).values())
    assert method.shared_base(model) == {}


def test_rolora_A_rounds_are_exact_too():
    model, method = _model("rolora")
    method.begin_round(model, 0)
    model, _ = _aggregate_weights(model, method, _client_states(model, 3), [1.0, 1.0, 1.0])
    method.begin_round(model, 1)  # B̄ ≠ 0 now, so A's round moves ΔW
    states = _client_states(model, 3, seed=5)
    assert all(".lora_A." in k or "classifier" in k for k in states[0])
    weights = [1.0, 2.0, 5.0]
    server, _ = _aggregate_weights(model, method, states, weights)
    assert _max_error(server, states, weights, model) < 1e-10


def test_train_only_narrows_and_restores():
    model, method = _model("rolora")
    method.end_round(model)
    keys = [k for k in trainable_state(model) if ".lora_A." in k]
    with train_only(model, keys):
        assert set(trainable_state(model)) == set(keys)
    assert any(".lora_B." in k for k in trainable_state(model))
    base = next(n for n, _ in model.named_parameters() if n.endswith("base_layer.weight"))
    with pytest.raises(ConfigError, match="not trainable"), train_only(model, [base]):
        pass


def test_rolora_noise_dimension_is_the_larger_factor_whichever_round_trains_it():
    # On the FFN's output layer (48 → 32) A (r × 48) outgrows B (32 × r), and RoLoRA's round 0
    # trains B: a count of round 0 alone (a cycle of one round) would undercount the noise.
    model = tiny_bert().double()
    cls, _ = method_class("rolora")
    method = cls(rank=RANK, scaling=2.0)
    targets = find_target_modules(model, ("output.dense",), rank=RANK)
    method.inject(model, targets, generator=torch.Generator().manual_seed(0),
                  factors=random_orthonormal_init(targets, rank=RANK, seed=0).factors)
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n)
    layers = list(lora_layers(model).values())
    by_factor = {part: head + sum(getattr(layer, part).weight.numel() for layer in layers)
                 for part in ("lora_B", "lora_A")}
    assert by_factor["lora_A"] > by_factor["lora_B"]  # else this test could not tell
    assert method.noised_parameters(model) == by_factor["lora_A"]
    # and the count leaves every factor trainable again for checkpoints and adapters
    assert all(layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
               for layer in layers)
