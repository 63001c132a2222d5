"""A data holder's own privacy policy: what a node accepts from the server, and its own ledger.

In record-level DP the server is one of the parties the guarantee protects against, so a
node cannot take the server's word for σ, the clip norm or how many rounds there will be. A
:class:`NodePrivacyPolicy` is built from the node's own configuration. Before every round it

1. checks the plan the server announces (:class:`AnnouncedPlan`) against its limits: DP on,
   record-level unit, clip norm at most its own, no more rounds or local steps than allowed;
2. recomputes σ itself, calibrated for that plan from its *own* Nᵢ, target ε and δ, and
   refuses a σ below it (σ = 0 included);
3. pins the plan's digest in its own ledger on first contact and refuses a different plan,
   a replayed round or a round past the plan later on;
4. reserves the round's DP-SGD steps in its own :class:`accounting.PrivacyLedger` on disk
   *before* training, with its own :class:`accounting.BudgetGuard`, and commits after.

A refusal raises :class:`NodeRefusalError` before anything is trained or charged. The module
imports neither Flower nor torch (only ``accounting``), so any round driver can call it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from accounting import (
    ACCOUNTANTS,
    BudgetExceededError,
    BudgetGuard,
    FederatedPlan,
    PrivacyLedger,
    calibrate_noise_multiplier,
)
from accounting.errors import AccountingError
from accounting.events import sampled_gaussian_event
from fedsb_dp.errors import ConfigError

if TYPE_CHECKING:
    from fedsb_dp.federated.run_config import RunConfig

logger = logging.getLogger(__name__)

#: Node-config keys the policy reads (Flower ``--node-config``), and what they set.
POLICY_KEYS = {
    "target-epsilon": "target_epsilon",
    "target-delta": "target_delta",
    "max-grad-norm": "max_grad_norm",
    "max-rounds": "max_rounds",
    "max-local-steps": "max_local_steps",
    "accountant": "accountant",
}
LEDGER_SUFFIX = ".fedsb-node-ledger.json"
STATE_DIR_ENV = "FEDSB_DP_NODE_DIR"
LEDGER_ROLE = "federated-node"


class NodeRefusalError(ConfigError):
    """The node refuses a round instruction; nothing was trained or charged."""


@dataclass(frozen=True)
class AnnouncedPlan:
    """What the server says the whole run will do (every field public).

    Attributes:
        private: Whether the run claims DP (``False`` for ``no_dp`` runs).
        dp_level: Privacy unit, ``"example"`` for record-level DP-SGD on the node.
        target_epsilon: The federation's target ε (``None`` for non-private runs).
        target_delta: The δ the server calibrated with.
        allow_large_delta: Whether the run accepted δ ≥ 1/N_total by override.
        rounds: Planned rounds.
        local_steps: DP-SGD steps per round (K).
        expected_batch_size: b; this node samples at qᵢ = b / Nᵢ.
        max_grad_norm: C, the per-example clip norm.
        noise_multiplier: σ the server asks the node to train with.
        accountant: The accountant the server calibrated with.
        seeded: Whether noise comes from a public seed (then it is not a private release).
        setup_digest: Hash of everything else the server sent at setup (model, data, seeds),
            so that any change of the run is a changed plan.

    """

    private: bool
    dp_level: str
    target_epsilon: float | None
    target_delta: float
    allow_large_delta: bool
    rounds: int
    local_steps: int
    expected_batch_size: int
    max_grad_norm: float
    noise_multiplier: float
    accountant: str
    seeded: bool
    setup_digest: str

    @classmethod
    def from_run_config(cls, config: RunConfig, *, noise_multiplier: float,
                        target_delta: float | None, setup_digest: str) -> AnnouncedPlan:
        """The plan of a run's settings, with the σ and δ the server announced.

        Raises:
            NodeRefusalError: If a private plan names no δ.

        """
        delta = target_delta if target_delta is not None else config.delta
        if config.private and delta is None:
            raise NodeRefusalError("the server announced no δ for a private run")
        return cls(private=config.private, dp_level=config.dp_level,
                   target_epsilon=config.epsilon,
                   target_delta=float(delta) if delta is not None else 0.5,
                   allow_large_delta=config.allow_large_delta, rounds=config.rounds,
                   local_steps=config.local_steps, expected_batch_size=config.batch_size,
                   max_grad_norm=float(config.max_grad_norm),
                   noise_multiplier=float(noise_multiplier), accountant=config.accountant,
                   seeded=config.seed is not None, setup_digest=setup_digest)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (stored in the node's ledger metadata)."""
        return asdict(self)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the plan: pinned on first contact."""
        body = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class NodeReservation:
    """A round reserved in the node's ledger, to :meth:`NodePrivacyPolicy.commit` after it ran."""

    ledger_path: str
    token: str
    round_index: int


def _number(key: str, value: Any, *, integer: bool = False) -> float | int:
    kind = "an integer ≥ 1" if integer else "a finite number > 0"
    if isinstance(value, bool):
        raise ConfigError(f"node config {key}={value!r} must be {kind}")
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key}={value!r} must be {kind}") from None
    if integer and (number < 1 or number != float(value)):
        raise ConfigError(f"node config {key}={value!r} must be {kind}")
    if not integer and not (number > 0 and math.isfinite(number)):
        raise ConfigError(f"node config {key}={value!r} must be {kind}")
    return number


def default_ledger_path(node_config: Mapping[str, Any], *, client_id: str, run_id: int | str,
                        data_path: str | None) -> str:
    """Where the node keeps its ledger when ``ledger-path`` is not set.

    Next to the node's own data file (one ledger per data file: joining another run with the
    same data needs an explicit ``ledger-path``), or, for the built-in partition of the
    project's dataset, under ``node-state-dir`` (``$FEDSB_DP_NODE_DIR``, default
    ``~/.fedsb-dp/nodes``) per Flower run.
    """
    explicit = node_config.get("ledger-path")
    if explicit:
        return os.path.abspath(os.path.expanduser(str(explicit)))
    if data_path:
        return os.path.abspath(os.path.expanduser(data_path)) + LEDGER_SUFFIX
    state_dir = (node_config.get("node-state-dir") or os.environ.get(STATE_DIR_ENV)
                 or os.path.join("~", ".fedsb-dp", "nodes"))
    return os.path.join(os.path.abspath(os.path.expanduser(str(state_dir))), f"run-{run_id}",
                        f"{client_id}.ledger.json")


@dataclass(frozen=True)
class NodePrivacyPolicy:
    """The node's own privacy limits; unset limits are taken from the first plan and pinned.

    Without any policy key the node still refuses a non-private plan, σ = 0 and any σ below
    what its own calibration gives for the announced (ε, δ, rounds, steps, b) and its own Nᵢ;
    the plan is then pinned in its ledger, so rounds, steps and clip norm cannot grow later.

    Attributes:
        ledger_path: The node's own ledger file (``PrivacyLedger`` format).
        target_epsilon: The node's ε; ``None`` accepts the server's target.
        target_delta: The node's δ; ``None`` accepts the server's δ.
        max_grad_norm: Largest clip norm C the node accepts.
        max_rounds: Most rounds the node trains in this run.
        max_local_steps: Most DP-SGD steps per round.
        accountant: Accountant of the node's calibration and budget (default: the plan's).

    """

    ledger_path: str
    target_epsilon: float | None = None
    target_delta: float | None = None
    max_grad_norm: float | None = None
    max_rounds: int | None = None
    max_local_steps: int | None = None
    accountant: str | None = None

    def __post_init__(self) -> None:
        if not self.ledger_path:
            raise ConfigError("the node needs a ledger path (node config ledger-path)")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ConfigError(f"node config target-delta={self.target_delta!r} must be in "
                              "(0, 1)")
        if self.accountant is not None and self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"node config accountant={self.accountant!r} is not one of "
                              f"{ACCOUNTANTS}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], *, client_id: str,
                         run_id: int | str, data_path: str | None = None) -> NodePrivacyPolicy:
        """Read the policy keys (:data:`POLICY_KEYS`) of a node's configuration.

        Raises:
            ConfigError: For a value out of its range (named, with the range).

        """
        values: dict[str, Any] = {}
        for key, name in POLICY_KEYS.items():
            value = node_config.get(key)
            if value is None or value == "":
                continue
            if name == "accountant":
                values[name] = str(value)
            elif name in ("max_rounds", "max_local_steps"):
                values[name] = _number(key, value, integer=True)
            else:
                values[name] = _number(key, value)
        path = default_ledger_path(node_config, client_id=client_id, run_id=run_id,
                                   data_path=data_path)
        return cls(ledger_path=path, **values)

    # ------------------------------------------------------------------ the checks
    def _targets(self, plan: AnnouncedPlan) -> tuple[float, float, str]:
        epsilon = self.target_epsilon if self.target_epsilon is not None else plan.target_epsilon
        delta = self.target_delta if self.target_delta is not None else plan.target_delta
        if epsilon is None:
            raise NodeRefusalError("the plan names no target ε and the node has none "
                                   "(node config target-epsilon)")
        return float(epsilon), float(delta), self.accountant or plan.accountant

    def required_noise_multiplier(self, plan: AnnouncedPlan, *, client_id: str,
                                  num_records: int) -> float:
        """σ from the node's own calibration of the announced plan on its own Nᵢ.

        Raises:
            NodeRefusalError: If the plan cannot meet the node's target at any σ.

        """
        epsilon, delta, accountant = self._targets(plan)
        key = (plan.digest(), epsilon, delta, accountant, client_id, num_records)
        if key not in _calibrations:
            own = FederatedPlan(
                sampling_probabilities={client_id: plan.expected_batch_size / num_records},
                local_steps=plan.local_steps, rounds=plan.rounds)
            try:
                _calibrations[key] = calibrate_noise_multiplier(
                    target_epsilon=epsilon, target_delta=delta, plan=own,
                    accountant=accountant).noise_multiplier
            except AccountingError as exc:
                raise NodeRefusalError(f"{client_id}: the plan cannot meet this node's "
                                       f"target: {exc}") from None
        return _calibrations[key]

    def check_plan(self, plan: AnnouncedPlan, *, client_id: str, num_records: int) -> float:
        """Refuse a plan outside the node's limits; return the node's own σ for it.

        Raises:
            NodeRefusalError: Naming what was refused and the node's limit.

        """
        if not plan.private:
            raise NodeRefusalError(f"{client_id} refuses a non-private plan (no_dp): this "
                                   "node only trains with DP-SGD")
        if plan.dp_level != "example":
            raise NodeRefusalError(f"{client_id} refuses dp_level={plan.dp_level!r}: the "
                                   "node runs record-level DP-SGD ('example') only")
        sigma = plan.noise_multiplier
        if not (math.isfinite(sigma) and sigma > 0):
            raise NodeRefusalError(f"{client_id} refuses noise multiplier σ={sigma!r}: it "
                                   "must be a finite number > 0")
        if not (math.isfinite(plan.max_grad_norm) and plan.max_grad_norm > 0):
            raise NodeRefusalError(f"{client_id} refuses clip norm {plan.max_grad_norm!r}: "
                                   "it must be a finite number > 0")
        if self.max_grad_norm is not None and plan.max_grad_norm > self.max_grad_norm:
            raise NodeRefusalError(f"{client_id} refuses clip norm C={plan.max_grad_norm}: "
                                   f"this node allows C ≤ {self.max_grad_norm}")
        if self.max_rounds is not None and plan.rounds > self.max_rounds:
            raise NodeRefusalError(f"{client_id} refuses a plan of {plan.rounds} rounds: "
                                   f"this node allows at most {self.max_rounds}")
        if self.max_local_steps is not None and plan.local_steps > self.max_local_steps:
            raise NodeRefusalError(f"{client_id} refuses {plan.local_steps} local steps per "
                                   f"round: this node allows at most {self.max_local_steps}")
        if not 1 <= plan.expected_batch_size <= num_records:
            raise NodeRefusalError(f"{client_id} refuses expected batch size "
                                   f"{plan.expected_batch_size}: it must be in [1, "
                                   f"{num_records}] (this node's records)")
        required = self.required_noise_multiplier(plan, client_id=client_id,
                                                  num_records=num_records)
        if sigma < required:
            epsilon, delta, _ = self._targets(plan)
            raise NodeRefusalError(
                f"{client_id} refuses noise multiplier σ={sigma:.6g}: its own calibration of "
                f"the plan ({plan.rounds} rounds × {plan.local_steps} steps, "
                f"q={plan.expected_batch_size}/{num_records}) for ε={epsilon:g}, "
                f"δ={delta:g} needs σ ≥ {required:.6g}")
        return required

    # ------------------------------------------------------------------ the ledger
    def _open_ledger(self, plan: AnnouncedPlan, *, client_id: str, num_records: int,
                     required: float) -> PrivacyLedger:
        if os.path.exists(self.ledger_path):
            ledger = PrivacyLedger.load(self.ledger_path)
            meta = ledger.metadata
            if meta.get("role") != LEDGER_ROLE or ledger.dataset_sizes != {
                    client_id: num_records}:
                raise NodeRefusalError(
                    f"{self.ledger_path} is not this node's ledger for {client_id} with "
                    f"{num_records} records (it holds {ledger.dataset_sizes}); give the node "
                    "its own ledger-path")
            if meta.get("plan_digest") != plan.digest():
                raise NodeRefusalError(
                    f"{client_id} refuses a changed plan: its ledger {self.ledger_path} pinned "
                    f"plan {str(meta.get('plan_digest'))[:16]}…, the server now sends "
                    f"{plan.digest()[:16]}…. A new run needs a new ledger-path")
            return ledger
        epsilon, delta, accountant = self._targets(plan)
        try:
            return PrivacyLedger(
                unit="example", dataset_sizes={client_id: num_records},
                target_epsilon=epsilon, target_delta=delta,
                allow_large_delta=plan.allow_large_delta and self.target_delta is None,
                metadata={"role": LEDGER_ROLE, "plan_digest": plan.digest(),
                          "plan": plan.to_dict(), "node_policy": self.limits(),
                          "accountant": accountant, "required_noise_multiplier": required,
                          "noise_multiplier": plan.noise_multiplier,
                          "max_grad_norm": plan.max_grad_norm, "sampling": "poisson",
                          "seed_mode": "seeded" if plan.seeded else "os-entropy",
                          "noise_is_release": not plan.seeded, "dp_level": "example"})
        except AccountingError as exc:
            raise NodeRefusalError(f"{client_id} refuses the plan: {exc}") from None

    def limits(self) -> dict[str, Any]:
        """The node's own limits (``None`` = taken from the pinned plan)."""
        return {name: getattr(self, name) for name in POLICY_KEYS.values()}

    @staticmethod
    def _charged_rounds(ledger: PrivacyLedger) -> list[int]:
        body = ledger.to_json_dict()["body"]
        rounds = [r for e in body["entries"] if e["rounds"] for r in e["rounds"]]
        rounds += [p["round"] for p in body["pending"] if p["round"] is not None]
        return rounds

    def begin_round(self, plan: AnnouncedPlan, *, client_id: str, num_records: int,
                    round_index: int) -> NodeReservation:
        """Check the instruction, then reserve the round's steps in the node's ledger on disk.

        Returns:
            The reservation to commit once the round has run.

        Raises:
            NodeRefusalError: If the plan or the round is refused (nothing written).

        """
        required = self.check_plan(plan, client_id=client_id, num_records=num_records)
        ledger = self._open_ledger(plan, client_id=client_id, num_records=num_records,
                                   required=required)
        last_round = min(plan.rounds, self.max_rounds or plan.rounds) - 1
        if not 0 <= round_index <= last_round:
            raise NodeRefusalError(f"{client_id} refuses round {round_index + 1}: the plan "
                                   f"has rounds 1..{last_round + 1}")
        charged = self._charged_rounds(ledger)
        if charged and round_index <= max(charged):
            raise NodeRefusalError(f"{client_id} refuses round {round_index + 1}: round "
                                   f"{max(charged) + 1} is already charged in its ledger "
                                   "(replayed or out-of-order round)")
        steps = ledger.steps(client_id)
        if steps + plan.local_steps > (last_round + 1) * plan.local_steps:
            raise NodeRefusalError(f"{client_id} refuses round {round_index + 1}: its ledger "
                                   f"already holds {steps} steps, the plan allows "
                                   f"{(last_round + 1) * plan.local_steps}")
        epsilon, delta, accountant = self._targets(plan)
        step = sampled_gaussian_event(
            sampling_probability=plan.expected_batch_size / num_records,
            noise_multiplier=plan.noise_multiplier)
        guard = BudgetGuard(ledger, target_epsilon=epsilon, delta=delta, accountant=accountant)
        try:
            token = guard.reserve_round({client_id: (step, plan.local_steps)},
                                        round_index=round_index)
        except BudgetExceededError as exc:
            raise NodeRefusalError(f"{client_id} refuses round {round_index + 1}: "
                                   f"{exc}") from None
        os.makedirs(os.path.dirname(self.ledger_path), exist_ok=True)
        ledger.save(self.ledger_path)
        logger.info("%s: round %d reserved in %s (σ=%.6g ≥ own %.6g)", client_id,
                    round_index + 1, self.ledger_path, plan.noise_multiplier, required)
        return NodeReservation(self.ledger_path, token, round_index)

    @staticmethod
    def commit(reservation: NodeReservation) -> None:
        """The reserved round ran: move it into the node ledger's entries (saved)."""
        ledger = PrivacyLedger.load(reservation.ledger_path)
        ledger.commit(reservation.token)
        ledger.save(reservation.ledger_path)


# σ_own per (plan, targets, Nᵢ): a node process that trains several rounds calibrates once.
_calibrations: dict[tuple[Any, ...], float] = {}
