"""FedEx-LoRA: average A and B, and fold the residual mean(BᵢAᵢ) − B̄Ā into W0 (exact).

The global model W0 + s·mean(BᵢAᵢ) is exactly the clients' mean, but the residual is a dense
(rank ≤ (c+1)·r) matrix the clients must receive every round: the downlink grows with the
number of clients. It travels in whichever encoding is smaller: dense m×n, or the stacked
factors [p₁sB₁ … p_csB_c, −sB̄] and [A₁; …; A_c; Ā] whose product it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.methods.base import (
    Aggregate,
    mean_of_products,
    normalised_weights,
    stacked_factors,
)
from fedsb_dp.methods.fedit import FedIT
from fedsb_dp.methods.mean import weighted_mean


class FedExLoRA(FedIT):
    """FedEx-LoRA (FedIT plus the exact residual folded into the base weight)."""

    name = "fedex-lora"
    exact = True
    folds_base = True
    description = "LoRA A, B averaged plus the residual mean(BᵢAᵢ) − B̄Ā folded into W0 (exact)"

    def aggregate(self, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                  states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float] | None = None, *,
                  generator: torch.Generator | None = None) -> Aggregate:
        """Means of A, B and the head; the residual of every layer as a base update."""
        del global_state, generator
        p = normalised_weights(len(states), weights)
        mean = weighted_mean(states, p)
        downlink = dict(mean)
        encodings = {}
        for name, layer in lora_layers(model).items():
            B_bar = mean[f"{name}.lora_B.weight"].double()
            A_bar = mean[f"{name}.lora_A.weight"].double()
            residual = mean_of_products(states, p, name, self.scaling) - self.scaling * (
                B_bar @ A_bar)
            dtype = layer.base_layer.weight.dtype
            m, n = residual.shape
            stacked_rank = (len(states) + 1) * layer.rank
            if stacked_rank * (m + n) < m * n:
                B_stack, A_stack = stacked_factors(states, p, name, self.scaling)
                downlink[f"{name}.residual_B"] = torch.cat(
                    [B_stack, -self.scaling * mean[f"{name}.lora_B.weight"]], dim=1).to(dtype)
                downlink[f"{name}.residual_A"] = torch.cat(
                    [A_stack, mean[f"{name}.lora_A.weight"]], dim=0).to(dtype)
                encodings[name] = "factored"
            else:
                downlink[f"{name}.residual"] = residual.to(dtype)
                encodings[name] = "dense"
        kinds = sorted(set(encodings.values()))
        return Aggregate(state=mean, base_updates=self.base_updates(downlink),
                         downlink=downlink, details={"residual_encoding": ",".join(kinds)})

    def base_updates(self, downlink: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each layer's residual, dense or as the product of its sent factors."""
        out = {}
        for key, tensor in downlink.items():
            if key.endswith(".residual"):
                out[key.removesuffix(".residual")] = tensor
            elif key.endswith(".residual_B"):
                name = key.removesuffix(".residual_B")
                A = downlink[f"{name}.residual_A"]
                out[name] = (tensor.double() @ A.double()).to(tensor.dtype)
        return out
