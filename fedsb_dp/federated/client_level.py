"""Client-level DP aggregation: the unit protected is a whole client's data.

Each participating client's update ΔRᵢ = Rᵢ − R̄ (all trainable tensors jointly) is clipped to
norm S (:mod:`fedsb_dp.clipping`, the formula of Opacus' per-example clip); the server sums the
clipped updates, adds N(0, z²S²) to every coordinate and divides by a fixed public denominator
(the expected cohort size p·n, never the realised one). An update with a NaN/inf entry counts
as zero (within the sensitivity S), so one client's data cannot stop the run. With clients
joining each round independently with probability p, one round is
``PoissonSampledDpEvent(p, GaussianDpEvent(z))`` over clients (docs/privacy.md, "Trust model").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from fedsb_dp.clipping import clip_factors, joint_norms
from fedsb_dp.errors import ConfigError

logger = logging.getLogger(__name__)


def poisson_cohort(client_ids: Sequence[str], probability: float,
                   generator: torch.Generator) -> list[str]:
    """Each client joins independently with ``probability`` (may be empty).

    Drawn and compared in float64, like the record sampler
    (:func:`fedsb_dp.federated.client.poisson_indices`), so the rate is the accounted one.
    """
    if not 0 < probability <= 1:
        raise ConfigError(f"participation={probability} must be in (0, 1]")
    if probability == 1:
        return list(client_ids)
    draws = torch.rand(len(client_ids), generator=generator, dtype=torch.float64)
    return [cid for cid, u in zip(client_ids, draws.tolist(), strict=True) if u < probability]


def clipped_noisy_mean(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """R̄ + (Σ clip(ΔRᵢ, S) + N(0, z²S²)) / denominator.

    Args:
        global_state: R̄ (and head) the clients started from.
        client_states: Their states after local training.
        clip_norm: S, joint L2 bound on one client's update.
        noise_multiplier: z; noise std z·S per coordinate of the sum.
        denominator: Public normaliser (expected cohort size).
        generator: Noise source.

    Returns:
        The new global state.
    """
    if not clip_norm > 0:
        raise ConfigError(f"client clip norm={clip_norm} must be > 0")
    if not denominator > 0:
        raise ConfigError(f"denominator={denominator} must be > 0")
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    for state in client_states:
        delta = {k: state[k].to(torch.float64) - global_state[k].to(torch.float64)
                 for k in global_state}
        norm = joint_norms(d.unsqueeze(0) for d in delta.values())
        if not torch.isfinite(norm).all():
            # Before the noise this is private: no error, no stop, just no contribution.
            logger.debug("a non-finite client update was counted as zero")
            continue
        factor = clip_factors(norm, clip_norm)[0]
        for k in total:
            total[k] += factor * delta[k]
    out = {}
    for k, value in total.items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        noisy = (value + noise_multiplier * clip_norm * noise) / denominator
        out[k] = (global_state[k].to(torch.float64) + noisy).to(global_state[k].dtype)
    return out
