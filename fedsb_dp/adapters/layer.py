"""The LoRA-SB linear layer: a frozen base, frozen B and A, and a trainable r×r R."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsb_dp.devices import trainable_dtype
from fedsb_dp.errors import ConfigError


class SBLinear(nn.Module):
    """``y = base(x) + s · B(R(A · dropout(x)))`` with only R trainable.

    B (m×r) and A (r×n) are buffers, so they are never handed to an optimizer and Opacus sees
    no trainable parameter on this wrapper; R is a bias-free ``nn.Linear(r, r)`` whose weight is
    the matrix R (``F.linear(h, R) = h Rᵀ`` is R applied to column vectors), so Opacus' fast
    Linear per-sample-gradient path computes exactly R's per-example gradients.

    Args:
        base_layer: The pretrained linear layer (its parameters are frozen here).
        B: m×r left factor (orthonormal columns for the data-derived initialisers).
        R: r×r initial value of the trained matrix.
        A: r×n right factor (orthonormal rows).
        dropout: Dropout probability on the adapter input.
        scaling: s.

    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        B: torch.Tensor,
        R: torch.Tensor,
        A: torch.Tensor,
        dropout: float = 0.0,
        scaling: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"SBLinear wraps nn.Linear, got {type(base_layer).__name__}")
        m, n = base_layer.out_features, base_layer.in_features
        r = R.shape[0]
        if B.shape != (m, r) or A.shape != (r, n) or R.shape != (r, r):
            raise ConfigError(
                f"factor shapes B{tuple(B.shape)}, R{tuple(R.shape)}, A{tuple(A.shape)} do not fit "
                f"a {m}×{n} layer at rank {r}: need B ({m}, {r}), R ({r}, {r}), A ({r}, {n})"
            )
        self.base_layer = base_layer
        for parameter in self.base_layer.parameters():
            parameter.requires_grad_(False)
        # The adapter path is float32 (or the base's, if wider) (see fedsb_dp.devices): R,
        # its gradients, optimizer state and noise, and B and A so the path has one dtype.
        device = base_layer.weight.device
        dtype = trainable_dtype(base_layer.weight.dtype)
        self.register_buffer("lora_sb_B", B.detach().to(device, dtype).clone()
                             .contiguous())
        self.register_buffer("lora_sb_A", A.detach().to(device, dtype).clone()
                             .contiguous())
        self.R = nn.Linear(r, r, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.R.weight.copy_(R)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scaling)
        self.merged = False
        # Rank-heterogeneous clients use only the leading directions; None means all r.
        self.active_rank: int | None = None

    @property
    def rank(self) -> int:
        """R."""
        return self.R.in_features

    def get_delta_weight(self) -> torch.Tensor:
        """ΔW = s·B R A, shaped like the base weight (out × in)."""
        k = self.rank if self.active_rank is None else self.active_rank
        return self.scaling * (self.lora_sb_B[:, :k] @ self.R.weight[:k, :k]
                               @ self.lora_sb_A[:k])

    def _mask(self, h: torch.Tensor) -> torch.Tensor:
        if self.active_rank is None or self.active_rank == self.rank:
            return h
        # Zeroing the input and output coordinates beyond k makes R's per-example gradients
        # vanish outside the leading k×k block, so only that block learns.
        keep = torch.arange(self.rank, device=h.device) < self.active_rank
        return h * keep.to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the base layer plus the adapter path (skipped once merged)."""
        y = self.base_layer(x)
        if self.merged:
            return y
        # In and out of float32 at the boundary; no-ops for a float32 base.
        x = x.to(self.R.weight.dtype)
        h = self._mask(self.R(self._mask(F.linear(self.dropout(x), self.lora_sb_A))))
        return y + (self.scaling * F.linear(h, self.lora_sb_B)).to(y.dtype)

    @torch.no_grad()
    def merge(self, *, safe_merge: bool = False) -> None:
        """Add ΔW into the base weight; the adapter path is then skipped.

        Args:
            safe_merge: Check the merged weight is finite before writing it.

        Raises:
            ValueError: If already merged, or ``safe_merge`` finds a non-finite value.

        """
        if self.merged:
            raise ValueError("layer is already merged")
        merged = (self.base_layer.weight + self.get_delta_weight()).to(
            self.base_layer.weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("merging would produce non-finite weights; adapter left unmerged")
        self.base_layer.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again."""
        if not self.merged:
            raise ValueError("layer is not merged")
        self.base_layer.weight.sub_(self.get_delta_weight().to(self.base_layer.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        """Shown by ``repr(model)``."""
        return f"rank={self.rank}, scaling={self.scaling}, merged={self.merged}"
