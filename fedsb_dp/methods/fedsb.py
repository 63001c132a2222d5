"""Fed-SB: LoRA-SB adapters with B, A fixed and shared; the server averages R (exact).

Σ pᵢ B Rᵢ A = B (Σ pᵢ Rᵢ) A, so the mean of the clients' R is exactly the mean of their
weight updates, and a round costs r² numbers per layer whatever the number of clients.

Rank-heterogeneous clients use the leading rᵢ columns of B and rows of A (ordered by singular
value) and train the leading rᵢ×rᵢ block of R; the server zero-pads each Rᵢ to r×r before the
mean, which stays exact because B[:, :rᵢ] Rᵢ A[:rᵢ] = B pad(Rᵢ) A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedsb_dp.adapters.config import SBConfig
from fedsb_dp.adapters.export import load_sb_adapter, save_sb_adapter
from fedsb_dp.adapters.inject import inject_adapters, sb_layers
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods.base import (
    SB_LEARNING_RATE,
    Aggregate,
    FederatedMethod,
    normalised_weights,
)
from fedsb_dp.methods.mean import weighted_mean


class FedSB(FederatedMethod):
    """Fed-SB (LoRA-SB, R trained and averaged)."""

    name = "fedsb"
    adapter = "lora-sb"
    exact = True
    description = "LoRA-SB: B, A fixed and shared, r×r R trained and averaged (exact)"
    # B and A are orthonormal, so ‖ΔW‖ = ‖ΔR‖: R needs larger steps than LoRA's A, B.
    default_learning_rate = SB_LEARNING_RATE
    # On Gemma-3-270M at ε = 3 (18 DP steps per client) 3e-2 left the response loss at 3.47;
    # 0.1 reached 0.60 and 72 % exact-match, smaller steps did worse (docs/benchmarks.md).
    causal_lm_learning_rate = 0.1

    def inject(self, model: nn.Module, targets: Mapping[str, nn.Linear], *,
               generator: torch.Generator, factors: Mapping[str, object] | None = None) -> None:
        """Inject :class:`SBLinear` layers with the given (initialiser's) factors."""
        del generator
        if factors is None:
            raise ConfigError("Fed-SB needs factors from an initialiser (w0-svd, "
                              "random-orthonormal or gradient-svd)")
        config = SBConfig(rank=self.rank, target_modules=tuple(targets), dropout=self.dropout,
                          scaling=self.scaling, train_head=self.train_head,
                          train_pooler=self.train_pooler)
        inject_adapters(model, {name: factors[name] for name in targets}, config)

    def setup_payload(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """B and A of every layer: the one-time broadcast."""
        out = {}
        for name, layer in sb_layers(model).items():
            out[f"{name}.lora_sb_B"] = layer.lora_sb_B
            out[f"{name}.lora_sb_A"] = layer.lora_sb_A
        return out

    def save_adapter(self, model: nn.Module, directory: str, sb: SBConfig, *,
                     base_model: str) -> None:
        """B, A, R and head in the LoRA-SB adapter format (:func:`save_sb_adapter`)."""
        save_sb_adapter(model, directory, sb, base_model=base_model)

    def load_adapter(self, model: nn.Module, directory: str,
                     targets: Mapping[str, nn.Linear]) -> None:
        """Inject the saved B, A and load R and the head."""
        del targets
        load_sb_adapter(model, directory)

    def aggregate(self, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                  states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float] | None = None, *,
                  generator: torch.Generator | None = None) -> Aggregate:
        """Weighted mean of R (zero-padding any rank-truncated Rᵢ) and of the head."""
        del model, generator
        padded = [pad_state(state, global_state) for state in states]
        mean = weighted_mean(padded, normalised_weights(len(states), weights))
        return Aggregate(state=mean, downlink=dict(mean))


def _is_r(name: str) -> bool:
    return name.endswith(".R.weight")


def truncate_state(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """What a rank-``rank`` client sends: the leading rank×rank block of every R, the head."""
    out = {}
    for name, tensor in state.items():
        if _is_r(name):
            if rank > tensor.shape[0]:
                raise ConfigError(f"client rank {rank} exceeds the global rank {tensor.shape[0]}")
            tensor = tensor[:rank, :rank]
        out[name] = tensor.detach().clone()
    return out


def pad_state(state: Mapping[str, torch.Tensor],
              reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-pad every (square, leading-block) R to the reference's shape."""
    out = {}
    for name, tensor in state.items():
        target = reference[name].shape
        if _is_r(name) and tensor.shape != target:
            k = tensor.shape[0]
            if tensor.dim() != 2 or tensor.shape[1] != k or k > target[0]:
                raise ConfigError(f"{name}: a {tuple(tensor.shape)} block cannot be padded to "
                                  f"{tuple(target)} (need a square block of side ≤ {target[0]})")
            padded = torch.zeros(target, dtype=tensor.dtype)
            padded[:k, :k] = tensor
            tensor = padded
        out[name] = tensor
    return out


def set_active_rank(model: nn.Module, rank: int | None) -> None:
    """Restrict every LoRA-SB layer to its leading ``rank`` directions (``None``: all)."""
    for layer in sb_layers(model).values():
        if rank is not None and not 1 <= rank <= layer.rank:
            raise ConfigError(f"client rank {rank} must be in 1..{layer.rank} (the global rank)")
        layer.active_rank = rank
