"""Classic LoRA layers for the baselines: ``W = W0 + s·B A`` with A and/or B trained.

FedIT, FFA-LoRA, FedEx-LoRA and FLoRA all train LoRA factors; they differ in which factors
train and in how the server aggregates. ``lora_A`` and ``lora_B`` are bias-free
``nn.Linear`` modules so Opacus' Linear per-sample-gradient path covers them, exactly as it
covers Fed-SB's R; the base layer stays frozen and owned by the wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from fedsb_dp.adapters.inject import check_rank_fits, replace_submodule
from fedsb_dp.devices import trainable_dtype
from fedsb_dp.errors import ConfigError


class LoRALinear(nn.Module):
    """``y = base(x) + s · B(A · dropout(x))``, ``s = alpha / r``.

    Args:
        base_layer: The pretrained linear layer (frozen here).
        A: r×n initial down-projection.
        B: m×r initial up-projection (zero in the usual initialisation, so ΔW⁰ = 0).
        scaling: s.
        dropout: Dropout probability on the adapter input.
        train_A: Whether ``lora_A`` trains (False for FFA-LoRA).
        train_B: Whether ``lora_B`` trains.
    """

    def __init__(self, base_layer: nn.Linear, *, A: torch.Tensor, B: torch.Tensor,
                 scaling: float = 1.0, dropout: float = 0.0, train_A: bool = True,
                 train_B: bool = True) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        m, n = base_layer.out_features, base_layer.in_features
        r = A.shape[0]
        if A.shape != (r, n) or B.shape != (m, r):
            raise ConfigError(f"factor shapes A{tuple(A.shape)}, B{tuple(B.shape)} do not fit a "
                              f"{m}×{n} layer: need A (r, {n}), B ({m}, r)")
        self.base_layer = base_layer
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        # Trained factors stay float32 (or wider) whatever the base (see fedsb_dp.devices).
        dtype, device = trainable_dtype(base_layer.weight.dtype), base_layer.weight.device
        self.lora_A = nn.Linear(n, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, m, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
        self.lora_A.weight.requires_grad_(train_A)
        self.lora_B.weight.requires_grad_(train_B)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scaling)

    @property
    def rank(self) -> int:
        """R."""
        return self.lora_A.out_features

    def get_delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, shaped like the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def effective_weight(self) -> torch.Tensor:
        """W0 + ΔW: what the layer computes (used by the exactness checks)."""
        return self.base_layer.weight.to(self.lora_A.weight.dtype) + self.get_delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank path."""
        y = self.base_layer(x)
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))
        return y + (self.scaling * self.lora_B(h)).to(y.dtype)

    @torch.no_grad()
    def fold_into_base(self, delta: torch.Tensor) -> None:
        """Add a dense ΔW to the frozen base weight (FedEx-LoRA's residual, FLoRA's merge)."""
        if delta.shape != self.base_layer.weight.shape:
            raise ConfigError(f"ΔW of shape {tuple(delta.shape)} does not fit the base weight "
                              f"{tuple(self.base_layer.weight.shape)}")
        self.base_layer.weight.add_(delta.to(self.base_layer.weight))  # its device and dtype

    def extra_repr(self) -> str:
        """Shown by ``repr(model)``."""
        return f"rank={self.rank}, scaling={self.scaling}"


def lora_init_A(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's usual A: U(−1/√n, 1/√n) (Kaiming-uniform with a = √5), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All injected LoRA layers of a model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    *,
    rank: int,
    scaling: float,
    generator: torch.Generator,
    dropout: float = 0.0,
    train_A: bool = True,
) -> dict[str, LoRALinear]:
    """Wrap each target in a :class:`LoRALinear` with A ~ LoRA init, B = 0.

    One generator is drawn layer after layer, so every layer gets its own A (the authors'
    FFA-LoRA code reset its seed inside the loop and gave every layer the same A).

    Args:
        model: Modified in place.
        targets: Qualified name → linear layer (from ``find_target_modules``).
        rank: r.
        scaling: s = alpha / r.
        generator: Source of the A matrices (public randomness: its seed may be shared).
        dropout: Adapter dropout.
        train_A: False freezes A (FFA-LoRA).

    Returns:
        The injected layers.
    """
    for name, base in targets.items():  # every layer first: a bad rank changes nothing
        check_rank_fits(name, base, rank)
    for name, base in targets.items():
        A = lora_init_A(rank, base.in_features, generator)
        B = torch.zeros(base.out_features, rank)
        wrapped = LoRALinear(base, A=A, B=B, scaling=scaling, dropout=dropout, train_A=train_A)
        replace_submodule(model, name, wrapped)
    return lora_layers(model)

