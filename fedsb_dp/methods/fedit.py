"""FedIT: LoRA A and B trained; the server averages A and B separately (inexact).

mean(Bᵢ)·mean(Aᵢ) ≠ mean(BᵢAᵢ): the global model is not the average of the clients' models,
and under DP the product of two independently noised factors carries a noise-times-noise
term. The baseline the other methods correct.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsb_dp.adapters.lora import inject_lora
from fedsb_dp.methods.base import FederatedMethod


class FedIT(FederatedMethod):
    """FedIT (FedAvg of LoRA factors)."""

    name = "fedit"
    adapter = "lora"
    exact = False
    description = "LoRA A and B trained, averaged separately (inexact)"
    train_A = True

    def inject(self, model: nn.Module, targets: Mapping[str, nn.Linear], *,
               generator: torch.Generator, factors: Mapping[str, object] | None = None) -> None:
        """LoRA layers with A ~ LoRA init (one generator, drawn layer after layer), B = 0."""
        del factors
        inject_lora(model, targets, rank=self.rank, scaling=self.scaling, generator=generator,
                    dropout=self.dropout, train_A=self.train_A)
        self._mark_trainable(model, lora_train_A=self.train_A)
