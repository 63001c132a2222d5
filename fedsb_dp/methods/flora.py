"""FLoRA: stack the clients' LoRA factors, merge the stack into W0, restart the adapters.

B = [p₁B₁ … p_cB_c] and A = [A₁; …; A_c] give s·B A = Σ pᵢ s·BᵢAᵢ exactly. Every client
receives the stacked factors (c·r(m+n) numbers per layer per round) and merges them into its
base weight; the next round starts from fresh adapters (A from a public generator, B = 0), so
each client's update is again relative to the merged model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedsb_dp.adapters.lora import lora_init_A, lora_layers
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods.base import (
    Aggregate,
    normalised_weights,
    stacked_factors,
)
from fedsb_dp.methods.fedit import FedIT
from fedsb_dp.methods.mean import weighted_mean


class FLoRA(FedIT):
    """FLoRA (stacking aggregation)."""

    name = "flora"
    exact = True
    folds_base = True
    description = "LoRA factors stacked across clients and merged into W0 each round (exact)"

    def aggregate(self, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                  states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float] | None = None, *,
                  generator: torch.Generator | None = None) -> Aggregate:
        """Merge Σ pᵢ s·BᵢAᵢ into W0; restart A (from ``generator``) and B = 0."""
        del global_state
        if generator is None:
            raise ConfigError("FLoRA's aggregate needs a generator for the fresh adapters")
        p = normalised_weights(len(states), weights)
        mean = weighted_mean(states, p)
        state, downlink = {}, {}
        layers = lora_layers(model)
        for key, tensor in mean.items():
            if ".lora_A." not in key and ".lora_B." not in key:
                state[key] = tensor  # head / pooler: averaged like every method
                downlink[key] = tensor
        for name, layer in layers.items():
            dtype = layer.base_layer.weight.dtype
            B_stack, A_stack = stacked_factors(states, p, name, self.scaling)
            downlink[f"{name}.stack_B"] = B_stack.to(dtype)
            downlink[f"{name}.stack_A"] = A_stack.to(dtype)
            state[f"{name}.lora_A.weight"] = lora_init_A(
                layer.rank, layer.lora_A.in_features, generator).to(dtype)
            state[f"{name}.lora_B.weight"] = torch.zeros_like(layer.lora_B.weight)
        # The clients' effective weights are W0 + s·BᵢAᵢ, so their mean is W0 plus the
        # product of the stacks; the restarted adapters contribute nothing until trained.
        return Aggregate(state=state, base_updates=self.base_updates(downlink),
                         downlink=downlink,
                         details={"restart": "fresh A from the public generator, B = 0"})

    def base_updates(self, downlink: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each layer's Σ pᵢ s·BᵢAᵢ, as the product of the sent stacks."""
        return {key.removesuffix(".stack_B"): (tensor.double() @ downlink[
                    key.removesuffix("_B") + "_A"].double()).to(tensor.dtype)
                for key, tensor in downlink.items() if key.endswith(".stack_B")}
