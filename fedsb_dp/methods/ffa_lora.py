"""FFA-LoRA: A frozen (random, shared by every client), only B trained and averaged (exact).

ΔW = s·B A is linear in B when A is fixed, so mean(Bᵢ)·A = mean(BᵢAᵢ). Each layer draws its
own A from one shared generator (the authors' code reset the seed inside its loop, giving
every layer the same matrix).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.methods.fedit import FedIT


class FFALoRA(FedIT):
    """FFA-LoRA (frozen A, averaged B)."""

    name = "ffa-lora"
    exact = True
    description = "LoRA with A frozen and shared, B trained and averaged (exact)"
    train_A = False

    def setup_payload(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The frozen A of every layer (or its public seed; counted as the tensors)."""
        return {f"{n}.lora_A.weight": layer.lora_A.weight
                for n, layer in lora_layers(model).items()}
