"""One-run audit (Steinke, Nasr, Jagielski 2023) of a client's real DP-SGD training.

m white-box canaries live in R-space (the concatenated R matrices of every SB layer): canary i
is a unit direction u_i (orthonormal when m ≤ dim R-space) whose per-example gradient is 2C·u_i,
so clipping brings it to C·u_i. Each canary is included by a fair coin; an included canary is
Poisson-sampled at the client's rate q on every step, like a record, and its gradient row is
appended to ``p.grad_sample`` through ``DPClient.train_round(canary_gradients=...)`` before the
step's clipping and noise. Everything else is the client's real loop: Poisson batches of its
records, Opacus per-example gradients, the DPOptimizer built by the client, its noise.

The score of canary i is Σ_t ⟨θ_t − θ_{t+1}, u_i⟩ over every local step (white-box: the
auditor sees every step), and :func:`accounting.empirical.one_run_epsilon_from_scores` turns
the scores into an ε lower bound at 95 % with its ceiling (what a perfect attack would reach
with the same canaries). The bound is loose by design — a soundness alarm, never "the privacy".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from accounting.accountants import compute_epsilon
from accounting.empirical import OneRunBound, one_run_epsilon_from_scores
from accounting.events import SelfComposedDpEvent
from fedsb_dp.adapters import trainable_state
from fedsb_dp.adapters.inject import sb_layers
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client import DPClient, LocalTrainingConfig

CANARY_NORM = 2.0  # canary gradient norm in units of C, so the clip is exercised


@dataclass(frozen=True)
class OneRunAuditResult:
    """Outcome of :func:`one_run_audit`.

    Attributes:
        bound: ε lower bound, its ceiling and the winning guess counts.
        epsilon_claimed: The accountant's ε for the client's steps (PRV upper bound).
        in_scores: Scores of included canaries.
        out_scores: Scores of excluded canaries.
        steps: DP-SGD steps run.
        sampling_probability: q of the client (and of the canaries).
        noise_multiplier: σ.
    """

    bound: OneRunBound
    epsilon_claimed: float
    in_scores: np.ndarray
    out_scores: np.ndarray
    steps: int
    sampling_probability: float
    noise_multiplier: float

    @property
    def epsilon_lower(self) -> float:
        """The 95 % ε lower bound."""
        return self.bound.epsilon_lower

    @property
    def flagged(self) -> bool:
        """True when the lower bound exceeds the claim (the run leaked more than accounted)."""
        return self.bound.epsilon_lower > self.epsilon_claimed


def canary_directions(dimension: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` unit vectors in R^dimension, orthonormal when count ≤ dimension."""
    if count < 1:
        raise ConfigError(f"canaries={count} must be ≥ 1")
    gaussian = torch.randn(dimension, count, generator=generator, dtype=torch.float64)
    if count <= dimension:
        return torch.linalg.qr(gaussian)[0].T.contiguous()
    return (gaussian / gaussian.norm(dim=0, keepdim=True)).T.contiguous()


def _r_parameters(model: nn.Module) -> list[nn.Parameter]:
    layers = sb_layers(model)
    if not layers:
        raise ConfigError("the model has no SB adapter: nothing spans R-space")
    return [layer.R.weight for layer in layers.values()]


def one_run_audit(
    client: DPClient,
    private_model: nn.Module,
    config: LocalTrainingConfig,
    *,
    canaries: int = 1000,
    rounds: int = 1,
    delta: float = 1e-5,
    significance: float = 0.05,
    seed: int = 0,
) -> OneRunAuditResult:
    """Train ``rounds`` × ``config.local_steps`` real steps of one client with canaries.

    Args:
        client: The client (its records are trained on as usual).
        private_model: The model in Opacus' ``GradSampleModule`` (SB adapters injected).
        config: Local training settings (σ, C, b, K, optimizer).
        canaries: m.
        rounds: Rounds (each ``config.local_steps`` steps; one client, so aggregation is the
            identity).
        delta: δ of the claims tested.
        significance: Test level (0.05 → 95 % confidence).
        seed: Seed of the canary directions, coins, canary sampling and the noise (an audit,
            not a private release).

    Returns:
        Scores, the ε lower bound with its ceiling, and the claim.
    """
    model = private_model._module if hasattr(private_model, "_module") else private_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    r_params = _r_parameters(model)
    ids = {id(p) for p in r_params}
    dimension = sum(p.numel() for p in r_params)
    gen = torch.Generator().manual_seed(seed)
    directions = canary_directions(dimension, canaries, gen)  # (m, d)
    included = torch.rand(canaries, generator=gen) < 0.5
    sampler = torch.Generator().manual_seed(seed + 1)
    q = config.expected_batch_size / client.num_records
    scale = CANARY_NORM * config.max_grad_norm

    def r_vector() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double() for p in r_params])

    def canary_rows(_step: int) -> dict[nn.Parameter, torch.Tensor]:
        chosen = included & (torch.rand(canaries, generator=sampler, dtype=torch.float64) < q)
        rows = (scale * directions[chosen]).float()
        out, offset = {}, 0
        for p in r_params:
            out[p] = rows[:, offset:offset + p.numel()].reshape(len(rows), *p.shape)
            offset += p.numel()
        for p in trainable:
            if id(p) not in ids:
                out[p] = torch.zeros((len(rows), *p.shape), dtype=p.dtype)
        return out

    scores = torch.zeros(canaries, dtype=torch.float64)
    previous = r_vector()

    def on_step(_step: int) -> None:
        nonlocal previous, scores
        current = r_vector()
        scores += directions @ (previous - current)
        previous = current

    state = trainable_state(model)
    steps = 0
    for round_index in range(rounds):
        update = client.train_round(
            private_model, state, config,
            noise_generator=torch.Generator().manual_seed(seed + 10 + round_index),
            sampling_generator=torch.Generator().manual_seed(seed + 1000 + round_index),
            dropout_seed=seed + round_index, on_step=on_step, canary_gradients=canary_rows)
        state = update.state
        steps += update.steps
        previous = r_vector()
    values = scores.numpy()
    bound = one_run_epsilon_from_scores(values[included.numpy()], values[~included.numpy()],
                                        delta=delta, significance=significance)
    claim = compute_epsilon(SelfComposedDpEvent(config.step_event(client.num_records), steps),
                            delta=delta).epsilon
    return OneRunAuditResult(bound, claim, values[included.numpy()], values[~included.numpy()],
                             steps, q, config.noise_multiplier)
