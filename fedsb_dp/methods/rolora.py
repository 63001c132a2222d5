"""RoLoRA: alternating optimisation of the LoRA factors, one factor per round (exact).

In rounds 1, 3, 5, … clients train B with A frozen and shared, and the server averages B;
in rounds 2, 4, 6, … they train A with B frozen and shared (the B̄ of the round before), and
the server averages A. With the other factor fixed, ΔW = s·B A is linear in the trained one,
so the mean of the clients' factor gives exactly the mean of their ΔW in every round. DP-SGD
noise touches only the factor trained that round: no noise-times-noise term.

The order: B first. LoRA starts from B⁰ = 0, where A's gradient is Bᵀ·(…) = 0, so a first
round on A would release pure noise. (Chen et al. alternate between the two projections;
we could not check their first-round order against their code, so this choice is ours and
stated here.) A⁰ is LoRA's usual draw from the public generator.

Communication: each round a client sends one factor (Σ r·m in B rounds, Σ r·n in A
rounds) and receives the averaged one: about half of FedIT's traffic. A stateless node also
receives the frozen factor (Flower's ``base`` record), as FedEx-LoRA's nodes receive W0.

Reference: Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of
LoRA", NeurIPS 2025.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.methods.fedit import FedIT

FACTORS = ("lora_B", "lora_A")


def trained_factor(round_index: int) -> str:
    """``"lora_B"`` in rounds 1, 3, … (0-based even indices), ``"lora_A"`` in 2, 4, …."""
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index={round_index!r} must be an integer ≥ 0")
    return FACTORS[round_index % 2]


class RoLoRA(FedIT):
    """RoLoRA (alternating: B averaged with A fixed, then A averaged with B fixed)."""

    name = "rolora"
    exact = True
    round_cycle = len(FACTORS)
    description = "LoRA factors trained in turn (B, then A), the other frozen; averaged (exact)"

    def begin_round(self, model: nn.Module, round_index: int) -> None:
        """Freeze the factor not trained in round ``round_index``."""
        trained = trained_factor(round_index)
        for layer in lora_layers(model).values():
            for part in FACTORS:
                getattr(layer, part).weight.requires_grad_(part == trained)

    def end_round(self, model: nn.Module) -> None:
        """Both factors trainable again (the state checkpoints and adapters hold)."""
        for layer in lora_layers(model).values():
            for part in FACTORS:
                getattr(layer, part).weight.requires_grad_(True)

    def shared_base(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The factor held fixed this round (none between rounds)."""
        return {f"{n}.{part}.weight": getattr(layer, part).weight.detach().to("cpu").contiguous()
                for n, layer in lora_layers(model).items() for part in FACTORS
                if not getattr(layer, part).weight.requires_grad}
