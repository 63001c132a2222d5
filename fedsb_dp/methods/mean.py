"""The weighted mean every aggregator starts from, computed in float64 into a fresh buffer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedsb_dp.errors import ConfigError


def weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ wᵢ stateᵢ / Σ wᵢ, computed into a fresh buffer (nothing carries over between rounds).

    Args:
        states: One trainable state per client, all with the same keys and shapes.
        weights: Public, non-negative weights (uniform if ``None``).

    Returns:
        The aggregated state.

    """
    if not states:
        raise ConfigError("cannot aggregate zero client updates")
    if weights is None:
        weights = [1.0] * len(states)
    if len(weights) != len(states) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"aggregation weights {list(weights)} must be ≥ 0 with a positive sum")
    total = float(sum(weights))
    keys = list(states[0])
    out = {}
    for key in keys:
        accumulator = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            accumulator += (weight / total) * state[key].to(torch.float64)
        out[key] = accumulator.to(states[0][key].dtype)
    return out
