"""Joint L2 clipping, shared by the DP initialisation and client-level aggregation.

DP-SGD steps clip inside Opacus' ``DPOptimizer``; the two mechanisms that clip outside it — the
per-example gradient sums of the DP gradient-SVD init and the whole-client updates of
client-level DP — use these helpers, with Opacus' own formula, so every clip in a run bounds a
contribution the same way: factor = min(1, C / (‖g‖ + 1e-6)), ‖g‖ taken over all tensors of
one contribution together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Added to the norm before dividing (as Opacus does): a zero contribution gets factor 1, not
#: a division by zero, and factor·‖g‖ stays ≤ C.
NORM_STABILISER = 1e-6


def joint_norms(per_example: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each contribution over all its tensors together.

    Args:
        per_example: Tensors whose first dimension indexes contributions (examples, or one
            client's update with a leading dimension of 1).

    Returns:
        A vector with one norm per contribution.
    """
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in per_example))


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale factors that bring each contribution's norm to at most ``max_norm``."""
    return (max_norm / (norms + NORM_STABILISER)).clamp(max=1.0)
