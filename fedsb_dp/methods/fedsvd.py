"""FedSVD: A orthonormal and frozen on clients, B trained; the server re-factorises B̄A by SVD.

Clients train only B under DP-SGD, so (as in FFA-LoRA) the noised update is linear in the
noised B and carries no noise-times-noise term, and mean(Bᵢ)·A = mean(BᵢA) is exact because
every client holds the same A. After averaging, the server takes the rank-r SVD of the
aggregated product, B̄A = U Σ Vᵀ, and starts the next round from B ← UΣ, A ← Vᵀ. B̄A has rank
at most r, so the truncation keeps it exactly: the global model is unchanged by the
re-factorisation, only its parametrisation moves (A follows the principal directions of the
aggregate, and its rows stay orthonormal, which bounds B's gradient norms under DP-SGD).

Privacy: the SVD reads only B̄ (an average of DP-noised releases) and the public previous A,
so it is post-processing and costs no privacy. Communication: clients send B; the server
sends the new B and the new A every round (Σ r(m+n) numbers per client per round).

A⁰ has orthonormal rows from the start (the QR factor of LoRA's usual draw from the public
generator), so the invariant holds in every round. Reference: Lee et al., "FedSVD: Adaptive
Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.methods.base import Aggregate, adapted_layers, normalised_weights
from fedsb_dp.methods.fedit import FedIT
from fedsb_dp.methods.mean import weighted_mean
from fedsb_dp.methods.state import load_tensors

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def orthonormal_rows(A: torch.Tensor) -> torch.Tensor:
    """The r×n matrix with orthonormal rows spanning the rows of ``A`` (QR, in float64)."""
    Q, R = torch.linalg.qr(A.double().T)
    # Fix QR's sign freedom (diag(R) > 0) so every node derives the same matrix.
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return (Q * signs).T.to(A.dtype)


def refactorise(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of B A: (UΣ, Vᵀ), computed in float64.

    Args:
        B: m×r aggregated up-projection.
        A: r×n current down-projection.
        rank: r, how many singular directions to keep.

    Returns:
        The new B (m×r) and A (r×n, orthonormal rows) with B_new A_new = B A when
        rank(B A) ≤ r.
    """
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


class FedSVD(FedIT):
    """FedSVD (frozen orthonormal A, averaged B, SVD re-factorisation every round)."""

    name = "fedsvd"
    exact = True
    description = ("LoRA with orthonormal A frozen on clients, B averaged (exact), B̄A "
                   "re-factorised by SVD each round (new A sent down)")
    train_A = False

    def inject(self, model: nn.Module, targets: Mapping[str, nn.Linear], *,
               generator: torch.Generator, factors: Mapping[str, object] | None = None) -> None:
        """LoRA layers with A⁰ = orthonormalised LoRA draw (frozen), B = 0."""
        super().inject(model, targets, generator=generator, factors=factors)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_A.weight.copy_(orthonormal_rows(layer.lora_A.weight))

    def setup_payload(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A⁰ of every layer (or its public seed; counted as the tensors)."""
        return {f"{n}{A_SUFFIX}": layer.lora_A.weight for n, layer in lora_layers(model).items()}

    def shared_base(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The current A of every layer: it changes each round, a stateless node needs it."""
        return {f"{n}{A_SUFFIX}": layer.lora_A.weight.detach().to("cpu").contiguous()
                for n, layer in lora_layers(model).items()}

    def aggregate(self, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                  states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float] | None = None, *,
                  generator: torch.Generator | None = None) -> Aggregate:
        """Mean of B and the head, then every layer's B̄A re-factorised as (UΣ, Vᵀ)."""
        del global_state, generator
        mean = weighted_mean(states, normalised_weights(len(states), weights))
        state, downlink = dict(mean), dict(mean)
        for name, layer in lora_layers(model).items():
            A = layer.lora_A.weight.detach().to("cpu")
            B_new, A_new = refactorise(mean[f"{name}{B_SUFFIX}"], A, layer.rank)
            state[f"{name}{B_SUFFIX}"] = B_new.to(mean[f"{name}{B_SUFFIX}"].dtype)
            downlink[f"{name}{B_SUFFIX}"] = state[f"{name}{B_SUFFIX}"]
            downlink[f"{name}{A_SUFFIX}"] = A_new.to(A.dtype)
        return Aggregate(state=state, downlink=downlink,
                         details={"refactorisation": "rank-r SVD of B̄A (post-processing)"})

    def apply(self, model: nn.Module, aggregate: Aggregate) -> None:
        """Load the new A of every layer (frozen) and the new B and head."""
        layers = adapted_layers(model)
        load_tensors(model, {k: v for k, v in aggregate.downlink.items()
                             if k.endswith(A_SUFFIX) and k.removesuffix(A_SUFFIX) in layers})
        set_trainable_state(model, aggregate.state)
