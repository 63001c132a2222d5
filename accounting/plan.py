"""The plan a run was calibrated for, as its ledger records it.

A run's server writes the plan into the ledger's metadata (key ``"recorded_plan"``; a node's
own ledger keeps the server's announced instruction plan under ``"plan"``) before anything is
released, so an auditor can compare what happened (the ledger's events) with what was
announced (the plan) from the ledger alone. On disk::

    {"format": "fedsb-dp/plan/v1", "unit": "example", "rounds": 3, "local_steps": 10,
     "sampling_probabilities": {"client-0": 0.0094, ...}, "noise_multiplier": 0.93,
     "clip_norm": 1.0, "accountant": "prv", "target_epsilon": 3.0, "target_delta": 9e-06,
     "init_events": {"client-0": {"type": "PoissonSampled", ...}},
     "init": {"method": "gradient-svd", "source": "dp", ...},
     "participation": {"rule": "all"}}

A record-level run with per-client noise (``--noise per-client``) calibrates one σᵢ per client
from its own plan and records them under ``noise_multipliers`` (ledger key → σᵢ); its plan
carries the format tag ``fedsb-dp/plan/v2`` so that a reader that knows only one σ refuses it
rather than checking every key against the wrong σ. ``noise_multiplier`` is then the largest
σᵢ. A shared-σ plan is written as ``v1``, exactly as before.

Keys of ``sampling_probabilities`` are the ledger's keys: clients for record-level DP (qᵢ =
b/Nᵢ of one DP-SGD step), the single key ``federation`` for client-level DP (the cohort rate
p of one round). ``local_steps`` is the number of releases per key per round it joins.
``participation`` says who is charged in a round:

* ``{"rule": "all"}``: every key, every round.
* ``{"rule": "seeded-sample", "fraction": p, "clients_per_round": k}``: k clients drawn from a
  public seed each round, charged only when drawn (no amplification is claimed).
* ``{"rule": "poisson-cohort", "probability": p}``: a secret Poisson cohort; the ledger's key
  is charged every round, whoever was drawn (the amplification is in its event).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from accounting.accountants import ACCOUNTANTS
from accounting.calibration import FederatedPlan
from accounting.errors import AccountingError
from accounting.events import DpEvent, event_from_dict

PLAN_FORMAT = "fedsb-dp/plan/v1"
#: The format of a plan with one σᵢ per ledger key (it adds ``noise_multipliers``).
PER_CLIENT_PLAN_FORMAT = "fedsb-dp/plan/v2"
PLAN_KEY = "recorded_plan"  # where a ledger's metadata keeps it
RULES = ("all", "seeded-sample", "poisson-cohort")
_FIELDS = ("format", "unit", "rounds", "local_steps", "sampling_probabilities",
           "noise_multiplier", "clip_norm", "accountant", "target_epsilon", "target_delta",
           "init_events", "init", "participation")


def _positive_int(name: str, value: Any, *, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise AccountingError(f"plan {name}={value!r} must be an integer ≥ {low}")


def _number(name: str, value: Any, *, low: float, high: float = math.inf,
            low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        left = "(" if low_open else "["
        raise AccountingError(f"plan {name}={value!r} must be a number in {left}{low}, {high}]")


def _check_participation(rule: Any) -> None:
    if not isinstance(rule, dict) or rule.get("rule") not in RULES:
        raise AccountingError(f"plan participation={rule!r} must be a dict whose 'rule' is one "
                              f"of {RULES}")
    if rule["rule"] == "seeded-sample":
        _number("participation.fraction", rule.get("fraction"), low=0, high=1, low_open=True)
        _positive_int("participation.clients_per_round", rule.get("clients_per_round"),
                      allow_zero=False)
    if rule["rule"] == "poisson-cohort":
        _number("participation.probability", rule.get("probability"), low=0, high=1,
                low_open=True)


@dataclass(frozen=True)
class RecordedPlan:
    """What a run announced before its first release (see the module docstring).

    Attributes:
        unit: ``"example"`` (record-level) or ``"client"`` (client-level).
        rounds: Planned rounds.
        local_steps: Releases per ledger key per round it joins.
        sampling_probabilities: Ledger key → the Poisson rate of one release, in (0, 1].
        noise_multiplier: σ of every training release (0 for a non-private run).
        clip_norm: The clipping bound the noise is calibrated to (per-sample C for
            record-level, the update bound S for client-level).
        accountant: The accountant σ was calibrated with.
        target_epsilon: The run's budget, or ``None`` (non-private).
        target_delta: δ.
        init_events: Ledger key → its init release, charged once before the first round.
        init: What the initialisation reads (``method``, ``source``, ``examples``,
            ``noise_multiplier``, ``data`` — whatever the run recorded).
        participation: Who is charged each round (see the module docstring).
        noise_multipliers: Ledger key → its own σᵢ (per-client noise), or ``None`` when every
            key trains at ``noise_multiplier``; when set, ``noise_multiplier`` is the largest.
    """

    unit: str
    rounds: int
    local_steps: int
    sampling_probabilities: dict[str, float]
    noise_multiplier: float
    clip_norm: float
    accountant: str
    target_epsilon: float | None
    target_delta: float
    init_events: dict[str, DpEvent] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    participation: dict[str, Any] = field(default_factory=lambda: {"rule": "all"})
    noise_multipliers: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.unit not in ("example", "client"):
            raise AccountingError(f"plan unit={self.unit!r} must be 'example' or 'client'")
        _positive_int("rounds", self.rounds)
        _positive_int("local_steps", self.local_steps)
        if not self.sampling_probabilities:
            raise AccountingError("plan sampling_probabilities must name at least one key")
        for key, q in self.sampling_probabilities.items():
            _number(f"sampling_probabilities[{key!r}]", q, low=0, high=1, low_open=True)
        _number("noise_multiplier", self.noise_multiplier, low=0)
        _number("clip_norm", self.clip_norm, low=0, low_open=True)
        if self.accountant not in ACCOUNTANTS:
            raise AccountingError(f"plan accountant={self.accountant!r} must be one of "
                                  f"{ACCOUNTANTS}")
        if self.target_epsilon is not None:
            _number("target_epsilon", self.target_epsilon, low=0, low_open=True)
        _number("target_delta", self.target_delta, low=0, high=1, low_open=True)
        unknown = sorted(set(self.init_events) - set(self.sampling_probabilities))
        if unknown:
            raise AccountingError(f"plan init_events name keys {unknown} that have no sampling "
                                  f"probability; keys: {sorted(self.sampling_probabilities)}")
        for key, event in self.init_events.items():
            if not isinstance(event, DpEvent):
                raise AccountingError(f"plan init event of {key!r} = {event!r} must be a DpEvent")
        if not isinstance(self.init, dict):
            raise AccountingError(f"plan init={self.init!r} must be a dict")
        _check_participation(self.participation)
        if self.noise_multipliers is not None:
            self._check_noise_multipliers()

    def _check_noise_multipliers(self) -> None:
        sigmas = self.noise_multipliers
        if not isinstance(sigmas, dict):
            raise AccountingError(f"plan noise_multipliers={sigmas!r:.80} must be a dict")
        if self.unit != "example":
            raise AccountingError(f"plan noise_multipliers (one σ per client) need unit "
                                  f"'example', not {self.unit!r}: client-level DP adds one "
                                  "server-side noise")
        if set(sigmas) != set(self.sampling_probabilities):
            raise AccountingError(f"plan noise_multipliers keys {sorted(sigmas)} ≠ sampling "
                                  f"keys {sorted(self.sampling_probabilities)}")
        for key, sigma in sigmas.items():
            _number(f"noise_multipliers[{key!r}]", sigma, low=0, low_open=True)
        if self.noise_multiplier != max(sigmas.values()):
            raise AccountingError(f"plan noise_multiplier={self.noise_multiplier!r} must be the "
                                  f"largest of noise_multipliers ({max(sigmas.values())!r})")

    @property
    def per_client(self) -> bool:
        """Whether each ledger key has its own σᵢ."""
        return self.noise_multipliers is not None

    def sigma_of(self, key: str) -> float:
        """σ of the training releases of one ledger key."""
        if self.noise_multipliers is not None:
            return self.noise_multipliers[key]
        return self.noise_multiplier

    @property
    def rule(self) -> str:
        """The participation rule's name."""
        return self.participation["rule"]

    def charges_every_round(self) -> bool:
        """Whether every ledger key is charged in every round (``all``, ``poisson-cohort``)."""
        return self.rule != "seeded-sample"

    def federated_plan(self) -> FederatedPlan:
        """The calibration plan (every key in every round: what σ was calibrated for)."""
        return FederatedPlan(sampling_probabilities=dict(self.sampling_probabilities),
                             local_steps=self.local_steps, rounds=self.rounds,
                             init_events=dict(self.init_events))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form kept in the ledger's metadata (v2 only with per-client σ)."""
        extra = ({} if self.noise_multipliers is None
                 else {"format": PER_CLIENT_PLAN_FORMAT,
                       "noise_multipliers": dict(self.noise_multipliers)})
        return {
            "format": PLAN_FORMAT, "unit": self.unit, "rounds": self.rounds,
            "local_steps": self.local_steps,
            "sampling_probabilities": dict(self.sampling_probabilities),
            "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
            "accountant": self.accountant, "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "init_events": {k: e.to_dict() for k, e in self.init_events.items()},
            "init": dict(self.init), "participation": dict(self.participation),
            **extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RecordedPlan:
        """Validate and rebuild a plan from :meth:`to_dict` output.

        Raises:
            AccountingError: If the format tag, a field or an event is not what the format
                allows (naming the value).
        """
        formats = (PLAN_FORMAT, PER_CLIENT_PLAN_FORMAT)
        if not isinstance(data, Mapping) or data.get("format") not in formats:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise AccountingError(f"not a {PLAN_FORMAT} or {PER_CLIENT_PLAN_FORMAT} plan "
                                  f"(format {found!r})")
        per_client = data["format"] == PER_CLIENT_PLAN_FORMAT
        fields = set(_FIELDS) | ({"noise_multipliers"} if per_client else set())
        if set(data) != fields:
            raise AccountingError(f"plan keys {sorted(data)} differ from the format's "
                                  f"{sorted(fields)}")
        events = data["init_events"]
        if not isinstance(events, Mapping):
            raise AccountingError(f"plan init_events={events!r:.80} must be a dict")
        probabilities = data["sampling_probabilities"]
        if not isinstance(probabilities, Mapping):
            raise AccountingError(f"plan sampling_probabilities={probabilities!r:.80} must be "
                                  "a dict")
        return cls(
            unit=data["unit"], rounds=data["rounds"], local_steps=data["local_steps"],
            sampling_probabilities=dict(probabilities),
            noise_multiplier=data["noise_multiplier"], clip_norm=data["clip_norm"],
            accountant=data["accountant"], target_epsilon=data["target_epsilon"],
            target_delta=data["target_delta"],
            init_events={k: event_from_dict(e) for k, e in events.items()},
            init=data["init"], participation=data["participation"],
            noise_multipliers=(dict(data["noise_multipliers"])
                               if per_client and isinstance(data["noise_multipliers"], Mapping)
                               else data["noise_multipliers"] if per_client else None))


__all__ = ["PER_CLIENT_PLAN_FORMAT", "PLAN_FORMAT", "PLAN_KEY", "RULES", "RecordedPlan"]
