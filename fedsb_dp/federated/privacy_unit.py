"""What one round releases and how it is accounted, per privacy unit (record or client).

The round protocol asks its unit who takes part, which events to reserve, with what noise
clients train and how the server combines their replies, so the protocol itself has no branch
on the DP level:

* :class:`RecordLevelDP` (default): each client runs DP-SGD (Poisson batches, clip C, noise σ)
  and is charged its steps; the server combines replies with the method's own aggregator.
* :class:`ClientLevelDP`: clients train without noise; the server clips each update ΔRᵢ to S,
  adds N(0, z²S²) to the sum and divides by the public expected cohort size; one round is one
  Poisson-sampled Gaussian over the population of clients, charged to the key ``federation``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from accounting import FederatedPlan
from accounting.events import (
    DpEvent,
    GaussianDpEvent,
    NonPrivateDpEvent,
    sampled_gaussian_event,
)
from accounting.plan import RecordedPlan
from fedsb_dp.federated import release
from fedsb_dp.federated.client import LocalTrainingConfig, sampling_probability
from fedsb_dp.federated.client_level import clipped_noisy_mean, poisson_cohort
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.methods import Aggregate, FederatedMethod
from fedsb_dp.rng import RandomStreams

FEDERATION = "federation"  # the single ledger key of client-level accounting


def sigma_of(sigma: float | Mapping[str, float], client_id: str) -> float:
    """σ of one client: the run's shared σ, or its own σᵢ from a per-client map."""
    return float(sigma) if isinstance(sigma, int | float) else sigma[client_id]


def local_config(config: RunConfig, noise_multiplier: float) -> LocalTrainingConfig:
    """The clients' local DP-SGD settings of a run, with the given σ."""
    return LocalTrainingConfig(
        expected_batch_size=config.batch_size, local_steps=config.local_steps,
        learning_rate=config.learning_rate, optimizer=config.optimizer,
        max_grad_norm=config.max_grad_norm, noise_multiplier=noise_multiplier,
        max_physical_batch_size=config.max_physical_batch_size,
    )


class PrivacyUnit(ABC):
    """The DP level of a run (see the module docstring)."""

    name: str

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    @abstractmethod
    def ledger_sizes(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Ledger keys → the number of protected units each holds."""

    @abstractmethod
    def plan(self, sizes: Mapping[str, int], init_events: Mapping[str, DpEvent]) -> FederatedPlan:
        """Everything the run will release, for calibrating σ once."""

    @property
    @abstractmethod
    def clip_norm(self) -> float:
        """The bound the noise is calibrated to."""

    @abstractmethod
    def participation_rule(self, num_clients: int) -> dict[str, Any]:
        """Who is charged each round, as the ledger's plan records it."""

    def recorded_plan(self, plan: FederatedPlan, *, noise_multiplier: float, delta: float,
                      init: Mapping[str, Any],
                      noise_multipliers: Mapping[str, float] | None = None) -> RecordedPlan:
        """The plan σ was calibrated for, with everything an auditor needs to check the ledger.

        Args:
            plan: The calibration plan from :meth:`plan`.
            noise_multiplier: The calibrated σ (0 for a non-private run).
            delta: The run's δ.
            init: What the initialisation reads (the ledger's ``init`` record).
            noise_multipliers: Ledger key → σᵢ with per-client noise (then
                ``noise_multiplier`` is the largest), ``None`` for one shared σ.
        """
        return RecordedPlan(
            unit=self.name, rounds=plan.rounds, local_steps=plan.local_steps,
            sampling_probabilities=dict(plan.sampling_probabilities),
            noise_multiplier=noise_multiplier, clip_norm=self.clip_norm,
            accountant=self.config.accountant, target_epsilon=self.config.epsilon,
            target_delta=delta, init_events=dict(plan.init_events), init=dict(init),
            participation=self.participation_rule(len(plan.sampling_probabilities)),
            noise_multipliers=(None if noise_multipliers is None
                               else dict(noise_multipliers)))

    @abstractmethod
    def participants(self, streams: RandomStreams, round_index: int,
                     client_ids: Sequence[str]) -> list[str]:
        """Who trains in a round."""

    @abstractmethod
    def round_events(self, sigma: float | Mapping[str, float], sizes: Mapping[str, int],
                     participants: Sequence[str]) -> dict[str, tuple[DpEvent, int]]:
        """The events a round releases (reserved before any instruction leaves the server).

        ``sigma`` is the run's σ, or client → σᵢ with per-client noise (record-level only).
        """

    @abstractmethod
    def local_noise(self, sigma: float) -> float:
        """σ the clients add in their local steps."""

    @property
    def min_valid_replies(self) -> int:
        """Fewest valid replies with which a round is aggregated."""
        return self.config.min_clients

    #: Whether a reply is already a release, so a non-finite one must stop the run (when it
    #: is not, the server clips it and a non-finite update contributes zero).
    replies_are_releases: bool = True

    @abstractmethod
    def combine(self, method: FederatedMethod, model: torch.nn.Module,
                global_state: Mapping[str, torch.Tensor],
                states: Sequence[Mapping[str, torch.Tensor]], *, sigma: float,
                streams: RandomStreams, round_index: int, num_clients: int) -> Aggregate:
        """The server's aggregate of the valid replies."""

    def summary(self, engine: str) -> dict[str, Any]:
        """What the run summary says about this unit: its name and who is trusted."""
        return {"privacy_unit": self.name,
                "trust_model": release.trust_model(self.name, engine=engine)}


class RecordLevelDP(PrivacyUnit):
    """One record of one client: local DP-SGD, parallel composition over clients."""

    name = "example"

    def ledger_sizes(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Each client's records."""
        return dict(sizes)

    def plan(self, sizes: Mapping[str, int], init_events: Mapping[str, DpEvent]) -> FederatedPlan:
        """Every round × local steps of every client, plus its init event."""
        return FederatedPlan(
            sampling_probabilities={cid: sampling_probability(self.config.batch_size, n)
                                    for cid, n in sizes.items()},
            local_steps=self.config.local_steps, rounds=self.config.rounds,
            init_events=dict(init_events))

    @property
    def clip_norm(self) -> float:
        """The per-sample clipping bound C."""
        return self.config.max_grad_norm

    def _clients_per_round(self, num_clients: int) -> int:
        return max(self.config.min_clients, round(self.config.participation * num_clients))

    def participation_rule(self, num_clients: int) -> dict[str, Any]:
        """Everyone, or a public seeded sample charged only when drawn."""
        if self.config.participation >= 1.0:
            return {"rule": "all"}
        return {"rule": "seeded-sample", "fraction": self.config.participation,
                "clients_per_round": self._clients_per_round(num_clients)}

    def participants(self, streams: RandomStreams, round_index: int,
                     client_ids: Sequence[str]) -> list[str]:
        """All clients, or a seeded sample of ``participation``·n (no amplification claimed)."""
        config = self.config
        if config.participation >= 1.0:
            return list(client_ids)
        count = self._clients_per_round(len(client_ids))
        chosen = streams.numpy("participation", round_index).choice(
            len(client_ids), size=count, replace=False)
        return [client_ids[i] for i in sorted(chosen)]

    def round_events(self, sigma: float | Mapping[str, float], sizes: Mapping[str, int],
                     participants: Sequence[str]) -> dict[str, tuple[DpEvent, int]]:
        """K Poisson-sampled Gaussian steps per participant at its σ (non-private: NonPrivate)."""
        return {cid: (local_config(self.config, sigma_of(sigma, cid)).step_event(sizes[cid])
                      if self.config.private else NonPrivateDpEvent(), self.config.local_steps)
                for cid in participants}

    def local_noise(self, sigma: float) -> float:
        """The calibrated σ."""
        return sigma

    def combine(self, method: FederatedMethod, model: torch.nn.Module,
                global_state: Mapping[str, torch.Tensor],
                states: Sequence[Mapping[str, torch.Tensor]], *, sigma: float,
                streams: RandomStreams, round_index: int, num_clients: int) -> Aggregate:
        """The method's own aggregator (the replies are already noised)."""
        del sigma, num_clients
        return method.aggregate(model, global_state, states,
                                generator=streams.torch("adapter-restart", round_index))


class ClientLevelDP(PrivacyUnit):
    """One whole client: noise-free local training, clipped and noised by the server.

    The server is trusted with every raw ΔRᵢ. The amplification by Poisson cohort sampling
    holds only if who took part stays secret, so a run publishes no cohort in its released
    files.
    """

    name = "client"
    replies_are_releases = False

    def ledger_sizes(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """One key for the whole population of clients."""
        return {FEDERATION: len(sizes)}

    def plan(self, sizes: Mapping[str, int], init_events: Mapping[str, DpEvent]) -> FederatedPlan:
        """One Poisson-sampled round per round (a client-level init would be refused earlier)."""
        del sizes, init_events
        return FederatedPlan(sampling_probabilities={FEDERATION: self.config.participation},
                             local_steps=1, rounds=self.config.rounds)

    @property
    def clip_norm(self) -> float:
        """The bound S on each client's update."""
        return self.config.client_clip_norm

    def participation_rule(self, num_clients: int) -> dict[str, Any]:
        """A secret Poisson cohort; the federation is charged every round."""
        del num_clients
        return {"rule": "poisson-cohort", "probability": self.config.participation}

    def participants(self, streams: RandomStreams, round_index: int,
                     client_ids: Sequence[str]) -> list[str]:
        """Each client joins independently with probability ``participation`` (may be none)."""
        return poisson_cohort(client_ids, self.config.participation,
                              streams.torch("cohort", round_index))

    def round_events(self, sigma: float | Mapping[str, float], sizes: Mapping[str, int],
                     participants: Sequence[str]) -> dict[str, tuple[DpEvent, int]]:
        """One event for the federation, whoever was drawn."""
        del sizes, participants
        if not isinstance(sigma, int | float):
            raise TypeError("client-level DP has one server-side σ, not one per client")
        if not self.config.private:
            return {FEDERATION: (NonPrivateDpEvent(), 1)}
        if self.config.participation >= 1:
            return {FEDERATION: (GaussianDpEvent(noise_multiplier=sigma), 1)}
        return {FEDERATION: (sampled_gaussian_event(
            sampling_probability=self.config.participation, noise_multiplier=sigma), 1)}

    def local_noise(self, sigma: float) -> float:
        """None: the server adds the noise."""
        del sigma
        return 0.0

    @property
    def min_valid_replies(self) -> int:
        """Zero: an empty cohort still releases the server's noise, which is accounted."""
        return 0

    def combine(self, method: FederatedMethod, model: torch.nn.Module,
                global_state: Mapping[str, torch.Tensor],
                states: Sequence[Mapping[str, torch.Tensor]], *, sigma: float,
                streams: RandomStreams, round_index: int, num_clients: int) -> Aggregate:
        """R̄ + (Σ clip(ΔRᵢ, S) + N(0, z²S²)) / (p·n)."""
        del method, model
        state = clipped_noisy_mean(
            global_state, states, clip_norm=self.config.client_clip_norm,
            noise_multiplier=sigma, denominator=self.config.participation * num_clients,
            generator=streams.torch("server-noise", round_index))
        return Aggregate(state=state, downlink=dict(state))


def privacy_unit(config: RunConfig) -> PrivacyUnit:
    """The unit object of a run's ``dp_level``."""
    return ClientLevelDP(config) if config.dp_level == "client" else RecordLevelDP(config)
