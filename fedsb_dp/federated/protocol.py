"""The round protocol: one server-side definition of a run, driven in-process or by Flower.

Order of operations (each release is in the ledger before its noise exists):

1. :meth:`RoundProtocol.create` checks δ < 1/N and every qᵢ ≤ 1, calibrates σ once for the
   whole plan (init events + every round × local steps) so the max-over-clients ε meets the
   target — or, with ``noise="per-client"``, one σᵢ per client from its own plan so that each
   client meets it — writes ``config.json``, ``provenance.json`` and the ledger (with the plan σ was
   calibrated for, from the privacy unit, so an audit needs the ledger alone), records any
   data-dependent init event, injects the agreed adapters and saves them (``init_adapter/``,
   so a resume never re-runs the init).
2. :meth:`RoundProtocol.configure_round` picks the participants, asks the budget guard to
   reserve their events (refusing a round that would pass the target) and saves the ledger —
   then, and only then, returns the instructions.
3. :meth:`RoundProtocol.aggregate_round` sorts the replies with one rule for both drivers:
   a missing or failed reply is *dropped*; a malformed or inconsistent one (client id, event,
   fingerprint, keys, shapes, dtype, steps) is *rejected*. A round with a rejected reply, or
   with fewer valid replies than the unit needs, is not aggregated (the global model stays) —
   except under client-level DP, where the secret cohort must not decide that: a rejected
   reply there counts as a zero update and the round goes on;
   otherwise the unit combines the valid replies and the method applies them. Either way the
   reservation is committed: instructions went out, so the steps count.
4. :meth:`RoundProtocol.finish` evaluates on the test split, saves ``final_adapter/`` and
   writes ``summary.json`` with ε recomputed from the saved ledger.

The drivers (:mod:`fedsb_dp.federated.inprocess`, :mod:`fedsb_dp.flower`) only move
instructions and replies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from accounting import (
    BudgetExceededError,
    BudgetGuard,
    PrivacyLedger,
    calibrate_noise_multiplier,
    calibrate_per_client,
    check_delta,
    default_delta,
    federation_epsilon,
)
from fedsb_dp import narration
from fedsb_dp.adapters import frozen_fingerprint, trainable_state
from fedsb_dp.errors import FedSBError
from fedsb_dp.federated import release
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.client import (
    ClientUpdate,
    LocalTrainingConfig,
    NonFiniteUpdateError,
    sampling_probability,
)
from fedsb_dp.federated.initialisation import init_events, init_record
from fedsb_dp.federated.privacy_unit import PrivacyUnit, local_config, privacy_unit, sigma_of
from fedsb_dp.federated.resume import uncommitted_note, uncommitted_rounds
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.server import payload_bytes, validate_update
from fedsb_dp.federated.setup import (
    Evaluator,
    client_ids,
    make_method,
    sb_config,
    targets_of,
)
from fedsb_dp.methods import FederatedMethod, adapted_layers, trainable_count, truncate_state
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)

PARTITION = "partition.json"


def epsilon_report(ledger_path: str, delta: float, accountant: str) -> dict[str, Any]:
    """ε recomputed from the ledger file on disk — never a number carried in memory."""
    ledger = PrivacyLedger.load(ledger_path)
    result = federation_epsilon(ledger, delta=delta, accountant=accountant)
    per_client = {cid: r.epsilon for cid, r in result.per_client.items()}
    worst = result.per_client[result.worst_client] if result.per_client else None
    return {
        "epsilon": result.epsilon,
        "epsilon_lower": worst.lower if worst else None,
        "epsilon_estimate": worst.estimate if worst else None,
        "accountant": worst.accountant if worst else accountant,
        "fallback_reason": worst.fallback_reason if worst else None,
        "delta": delta,
        "per_client_epsilon": per_client,
    }


@dataclass(frozen=True)
class Instruction:
    """What the server asks one client to do in one round (all of it public).

    Attributes:
        client_id: The addressee.
        stream_index: The client's index in the run's named random streams.
        round_index: 0-based round.
        local: Local DP-SGD settings, σ included.
        rank: The client's Fed-SB rank (``None``: the global rank).
        state: The trainable tensors it starts from, as sent (truncated to ``rank``).
        fingerprint: Hash of the frozen tensors it must hold.
    """

    client_id: str
    stream_index: int
    round_index: int
    local: LocalTrainingConfig
    rank: int | None
    state: dict[str, torch.Tensor]
    fingerprint: str


@dataclass
class RoundTicket:
    """A configured round: its reservation and instructions."""

    round_index: int
    participants: list[str]
    instructions: dict[str, Instruction]
    events: dict[str, tuple[Any, int]]
    token: str
    global_state: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    downlink: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """What happened in one round.

    Attributes:
        round_index: 0-based round.
        participants: Clients that were sent instructions (all charged).
        valid: Clients whose replies were aggregated (or would have been).
        dropped: Client → why no usable reply arrived (failure, timeout).
        rejected: Client → why its reply was refused.
        aggregated: Whether the global model was updated.
        bytes_up: Bytes of the valid replies.
        bytes_down: Bytes sent to the participants.
        metrics: Validation metrics after the round (``None`` values if not aggregated).
    """

    round_index: int
    participants: list[str]
    valid: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_by_client: dict[str, int] = field(default_factory=dict)
    bytes_down_by_client: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoUpdate:
    """Why a participant has no usable update.

    Attributes:
        reason: What happened (a failure, a timeout, a parse error).
        malformed: A reply arrived but could not be read: it is rejected, not dropped.
    """

    reason: str
    malformed: bool = False


ClientReply = ClientUpdate | NoUpdate


@dataclass
class Prepared:
    """A driver's server-side parts for :meth:`RoundProtocol.create` / ``resume``.

    Attributes:
        model: The pretrained model (no adapters yet).
        tokenizer: Its tokenizer.
        resolved_path: Where the model was loaded from (for exports).
        sizes: Client id → Nᵢ (public), in stream-index order.
        evaluator: The evaluator's validation and test splits.
        model_notes: What loading changed in the checkpoint (recorded in provenance).
    """

    model: torch.nn.Module
    tokenizer: Any
    resolved_path: str
    sizes: dict[str, int]
    evaluator: Evaluator
    model_notes: tuple[str, ...] = ()


def _init_description(config: RunConfig, method: FederatedMethod) -> str:
    """How the adapters start, in the words of the console."""
    if method.adapter == "lora":
        return "random A, B = 0"
    if config.init != "gradient-svd":
        return config.init
    return {"dp": "DP gradient-SVD", "public": "gradient-SVD on public data",
            "nonprivate": "NON-PRIVATE gradient-SVD"}.get(config.init_source,
                                                          config.init_source)


class RoundProtocol:
    """The server side of one run (see the module docstring).

    Build it with :meth:`create` (a new run) or :meth:`resume` (a run directory).
    """

    def __init__(self, *, config: RunConfig, prepared: Prepared, method: FederatedMethod,
                 unit: PrivacyUnit, ledger: PrivacyLedger, progress: dict[str, Any],
                 delta: float, streams: RandomStreams) -> None:
        self.config = config
        self.prepared = prepared
        self.model = prepared.model
        self.method = method
        self.unit = unit
        self.ledger = ledger
        self.progress = progress
        self.delta = delta
        self.streams = streams
        self.sigma: float = progress["noise_multiplier"]
        # Client → σᵢ with per-client noise (σ above is then the largest), else None.
        self.sigmas: dict[str, float] | None = progress.get("noise_multipliers")
        self.client_ids = client_ids(config)
        self.out = config.out
        self.status = "running"
        self.message: str | None = None
        self.operator: dict[str, Any] = {}
        self.started = time.time()
        self.guard = BudgetGuard(ledger, target_epsilon=config.epsilon if config.private
                                 else math.inf, delta=delta, accountant=config.accountant)

    # ------------------------------------------------------------------ construction
    def path(self, name: str) -> str:
        """A file of the run directory."""
        return os.path.join(self.out, name)

    @classmethod
    def create(cls, config: RunConfig, prepared: Prepared, *, engine: str,
               partition_seed: int, init_seed: int,
               initialise: Callable[[torch.nn.Module], None] | None = None,
               partition: Mapping[str, Any] | None = None,
               data_record: Mapping[str, Any] | None = None,
               public_init: Any = None) -> RoundProtocol:
        """Plan a new run and write its directory (nothing is released yet but the init).

        Args:
            config: The settings; ``config.out`` is the (new, empty) run directory.
            prepared: The model and the public client sizes.
            engine: ``"inprocess"`` or ``"flower"`` (recorded).
            partition_seed: Public seed of the simulated split.
            init_seed: Public seed of random adapter factors.
            initialise: Injects the method's adapters into ``prepared.model``, called after
                any init event is in the saved ledger (it may read client data then).
                ``None``: the driver already injected data-free adapters.
            partition: Operator-side partition diagnostics (``partition.json``).
            data_record: Operator-side digest of the training data (``data.json``), which
                a resume checks.
            public_init: The ``--init-data`` a public-source init reads (recorded).

        Raises:
            accounting.AccountingError: If δ is too large or the target unreachable.
            fedsb_dp.errors.ConfigError: For a rank or batch size that does not fit.

        """
        streams = RandomStreams(config.seed)
        unit = privacy_unit(config)
        method = make_method(config)
        sizes = prepared.sizes
        ledger_sizes = unit.ledger_sizes(sizes)
        units_total = sum(ledger_sizes.values())
        delta = config.delta if config.delta is not None else default_delta(units_total)
        if config.private:
            check_delta(delta, n_total=units_total, allow_large=config.allow_large_delta)
        for size in sizes.values():
            sampling_probability(config.batch_size, size)  # raises with a clear message
        if not adapted_layers(prepared.model):
            targets_of(config, prepared.model)  # the rank against every target, up front
        charged_init = init_events(config, sizes)
        plan = unit.plan(sizes, charged_init)
        if config.private:
            narration.say(f"calibrating σ for ε={config.epsilon:g} at δ={delta:.1e} over "
                          f"{config.rounds} rounds ({config.accountant.upper()}) …")
        sigmas: dict[str, float] | None = None
        if config.private and config.noise == "per-client":
            sigmas = {cid: result.noise_multiplier for cid, result in calibrate_per_client(
                target_epsilon=config.epsilon, target_delta=delta, plan=plan,
                accountant=config.accountant).items()}
            sigma = max(sigmas.values())
        else:
            sigma = (calibrate_noise_multiplier(
                target_epsilon=config.epsilon, target_delta=delta,
                plan=plan, accountant=config.accountant,
            ).noise_multiplier if config.private else 0.0)
        # σᵢ is a function of the public Nᵢ and settings, so it is released with them.
        per_client = {} if sigmas is None else {"noise": "per-client",
                                                "noise_multipliers": dict(sigmas)}

        out = config.out
        rd.claim_new_run_dir(out)
        rd.write_json_atomic(os.path.join(out, rd.CONFIG), {
            "config": config.to_dict(), "digest": config.digest(), "engine": engine})
        rd.write_json_atomic(os.path.join(out, rd.PROVENANCE), {
            **rd.provenance(config.digest(), seeded=streams.seeded), "engine": engine,
            **({"model_notes": list(prepared.model_notes)} if prepared.model_notes else {})})
        if partition is not None:
            rd.write_json_atomic(os.path.join(out, PARTITION), dict(partition))
        if data_record is not None:
            rd.write_json_atomic(os.path.join(out, rd.DATA), dict(data_record))
        init = init_record(config, public_init)
        ledger = PrivacyLedger(
            unit=config.dp_level, dataset_sizes=ledger_sizes, target_epsilon=config.epsilon,
            target_delta=delta, allow_large_delta=config.allow_large_delta,
            metadata={"seed_mode": "seeded" if streams.seeded else "os-entropy",
                      "noise_is_release": not streams.seeded, "sampling": "poisson",
                      "noise_multiplier": sigma, "max_grad_norm": config.max_grad_norm,
                      **per_client,
                      "method": config.method, "dp_level": config.dp_level, "init": init,
                      **({"client_clip_norm": config.client_clip_norm}
                         if config.dp_level == "client" else {})},
            # What σ was calibrated for, so an audit needs the ledger alone.
            plan=unit.recorded_plan(plan, noise_multiplier=sigma, delta=delta, init=init,
                                    noise_multipliers=sigmas),
        )
        ledger_path = os.path.join(out, rd.LEDGER)
        ledger.save(ledger_path)
        if charged_init:
            for cid, event in charged_init.items():
                ledger.record(cid, event, count=1, kind="init")
            ledger.save(ledger_path)
        model = prepared.model
        narration.say(f"initialising adapters ({_init_description(config, method)}) …")
        if initialise is not None:
            initialise(model)
        if not trainable_state(model):
            raise FedSBError("the model has no trainable adapter after initialisation")
        method.save_adapter(model, os.path.join(out, rd.INIT_ADAPTER), sb_config(config),
                            base_model=config.model)
        method.begin_round(model, 0)  # round 1's trainable set is what travels first
        initial = trainable_state(model)
        method.end_round(model)
        fingerprint = frozen_fingerprint(model)
        progress = {
            "completed_rounds": 0, "aggregated_rounds": 0, "failed_rounds": [],
            "partition_seed": partition_seed, "init_seed": init_seed,
            "noise_multiplier": sigma, "noise_multipliers": sigmas, "fingerprint": fingerprint,
            "init_fingerprint": fingerprint, "sizes": dict(sizes),
            "engine": engine,
            "bytes_setup": payload_bytes(method.setup_payload(model)) * len(sizes),
            "bytes_up": 0, "bytes_down": 0,
            # What the server sends each client at the start of the next round.
            "next_down_by_client": {
                cid: payload_bytes(cls._sent(config, initial, cid, list(sizes)))
                for cid in sizes},
        }
        rd.write_json_atomic(os.path.join(out, rd.PROGRESS), progress)
        return cls(config=config, prepared=prepared, method=method, unit=unit, ledger=ledger,
                   progress=progress, delta=delta, streams=streams)

    @staticmethod
    def saved(out: str) -> tuple[RunConfig, dict[str, Any]]:
        """The settings and progress of a run directory (what a driver needs to rebuild it).

        Raises:
            fedsb_dp.errors.ConfigError: If ``out`` is not a resumable run directory.

        """
        from fedsb_dp.errors import ConfigError

        if not os.path.exists(os.path.join(out, rd.PROGRESS)):
            raise ConfigError(f"{out!r} is not a resumable run directory (no {rd.PROGRESS})")
        saved = rd.read_json(os.path.join(out, rd.CONFIG))["config"]
        config = RunConfig.from_dict({**rd.saved_settings(saved), "out": out})
        return config, rd.read_json(os.path.join(out, rd.PROGRESS))

    @classmethod
    def resume(cls, out: str, prepared: Prepared) -> RoundProtocol:
        """Reopen a run directory at its last completed round.

        A round that was reserved but not committed (a crash inside it) stays charged in the
        ledger and is run again: conservative, and said in the summary.

        Raises:
            fedsb_dp.errors.FedSBError: If the saved adapter does not match its fingerprint.

        """
        config, progress = cls.saved(out)
        method = make_method(config)
        model = prepared.model
        method.load_adapter(model, os.path.join(out, rd.INIT_ADAPTER), targets_of(config, model))
        if progress["completed_rounds"] > 0:
            method.restore(model, load_file(os.path.join(out, rd.CHECKPOINT)))
        if frozen_fingerprint(model) != progress["fingerprint"]:
            raise FedSBError(f"{out}: saved adapter does not match its recorded fingerprint")
        ledger = PrivacyLedger.load(os.path.join(out, rd.LEDGER))
        protocol = cls(config=config, prepared=prepared, method=method,
                       unit=privacy_unit(config), ledger=ledger, progress=progress,
                       delta=ledger.target_delta, streams=RandomStreams(config.seed))
        # The summary's wall time will cover this attempt only: mark the restart for readers.
        release.append_operator(out, "resumed", {"completed_rounds": progress["completed_rounds"]})
        return protocol

    # ------------------------------------------------------------------ rounds
    @staticmethod
    def _rank(config: RunConfig, cid: str, ids: list[str]) -> int | None:
        return None if config.client_ranks is None else config.client_ranks[ids.index(cid)]

    @classmethod
    def _sent(cls, config: RunConfig, tensors: Mapping[str, torch.Tensor], cid: str,
              ids: list[str]) -> dict[str, torch.Tensor]:
        """What actually travels to or from a client of its rank."""
        rank = cls._rank(config, cid, ids)
        return dict(tensors) if rank is None else truncate_state(tensors, rank)

    @property
    def done(self) -> bool:
        """Whether no further round will be configured."""
        return (self.status != "running"
                or self.progress["completed_rounds"] >= self.config.rounds)

    def configure_round(self) -> RoundTicket | None:
        """Reserve the next round's releases (saved) and return its instructions.

        Returns:
            The ticket, or ``None`` when the run is over (all rounds done, or the next round
            would pass the budget — then :attr:`status` is ``"stopped-budget"``).

        """
        if self.done:
            return None
        t = self.progress["completed_rounds"]
        participants = self.unit.participants(self.streams, t, self.client_ids)
        noise = self.sigmas if self.sigmas is not None else self.sigma
        events = self.unit.round_events(noise, self.prepared.sizes, participants)
        try:
            token = self.guard.reserve_round(events, round_index=t)
        except BudgetExceededError as exc:
            self.status, self.message = "stopped-budget", str(exc)
            logger.warning("stopping before round %d: %s", t + 1, exc)
            return None
        self.ledger.save(self.path(rd.LEDGER))
        # An alternating method (RoLoRA) picks this round's factor; the fingerprint then
        # covers the factor it holds fixed (for every other method it is the saved one).
        self.method.begin_round(self.model, t)
        global_state = trainable_state(self.model)
        fingerprint = frozen_fingerprint(self.model)
        instructions = {
            cid: Instruction(client_id=cid, stream_index=self.client_ids.index(cid),
                             round_index=t, local=local_config(
                                 self.config, self.unit.local_noise(sigma_of(noise, cid))),
                             rank=self._rank(self.config, cid, self.client_ids),
                             state=self._sent(self.config, global_state, cid, self.client_ids),
                             fingerprint=fingerprint)
            for cid in participants}
        return RoundTicket(round_index=t, participants=participants,
                           instructions=instructions, events=events, token=token,
                           global_state=global_state, base=self.method.shared_base(self.model))

    def _check(self, instruction: Instruction, reply: ClientUpdate, sizes: Mapping[str, int],
               ) -> None:
        cid = instruction.client_id
        if reply.client_id != cid:
            raise FedSBError(f"the reply for {cid!r} came from {reply.client_id!r}")
        expected = instruction.local.step_event(sizes[cid]).to_dict()
        if json.dumps(reply.event.to_dict(), sort_keys=True) != json.dumps(expected,
                                                                             sort_keys=True):
            raise FedSBError(f"client {cid!r} reports event {reply.event.to_dict()}, it was "
                             f"instructed {expected}")
        validate_update(reply, global_state=instruction.state,
                        fingerprint=instruction.fingerprint,
                        expected_steps=instruction.local.local_steps,
                        finite_required=self.unit.replies_are_releases)

    def aggregate_round(self, ticket: RoundTicket,
                        replies: Mapping[str, ClientReply]) -> RoundOutcome:
        """Validate the replies, aggregate if the round stands, commit, checkpoint, evaluate.

        Args:
            ticket: From :meth:`configure_round`.
            replies: Participant → its update, or the reason it has none (missing keys count
                as no reply).

        Returns:
            The round's outcome (also appended to ``metrics.jsonl``).

        """
        outcome = RoundOutcome(round_index=ticket.round_index,
                               participants=list(ticket.participants))
        updates: dict[str, ClientUpdate] = {}
        for cid in ticket.participants:
            reply = replies.get(cid, NoUpdate("no reply before the round timeout"))
            if isinstance(reply, NoUpdate) and reply.malformed:
                outcome.rejected[cid] = reply.reason
                continue
            if isinstance(reply, NoUpdate):
                outcome.dropped[cid] = reply.reason
                logger.warning("round %d: %s dropped out (%s); its reserved steps stay "
                               "charged", ticket.round_index + 1, cid, reply.reason)
                continue
            try:
                self._check(ticket.instructions[cid], reply, self.prepared.sizes)
            except NonFiniteUpdateError as exc:
                # A noised update gone to NaN/inf (a step size too large) will not recover:
                # stop, with a released reason that names no client; details to the operator.
                outcome.rejected[cid] = "non-finite noised update"
                if self.status != "stopped-nonfinite":
                    self.status = "stopped-nonfinite"
                    self.message = release.NONFINITE_STOP_MESSAGE
                    release.append_operator(self.out, "stop", {
                        "status": self.status, "detail": str(exc),
                        "round": ticket.round_index + 1})
                continue
            except FedSBError as exc:
                outcome.rejected[cid] = str(exc)
                logger.error("round %d: rejected the reply of %s: %s", ticket.round_index + 1,
                             cid, exc)
                continue
            updates[cid] = reply
        outcome.valid = [cid for cid in ticket.participants if cid in updates]
        # Under client-level DP the cohort is secret, so whether a round aggregates must not
        # depend on who was in it: a rejected reply counts as a zero update (within the
        # sensitivity S), exactly like a non-finite one, and the reason stays operator-only.
        if outcome.rejected and self.unit.replies_are_releases:
            logger.error("round %d is not aggregated: %d reply(ies) rejected",
                         ticket.round_index + 1, len(outcome.rejected))
        elif len(outcome.valid) < self.unit.min_valid_replies:
            logger.error("round %d is not aggregated: %d valid replies, %d needed",
                         ticket.round_index + 1, len(outcome.valid),
                         self.unit.min_valid_replies)
        else:
            if outcome.rejected:
                logger.error("round %d: %d reply(ies) rejected and counted as zero updates",
                             ticket.round_index + 1, len(outcome.rejected))
            aggregate = self.unit.combine(
                self.method, self.model, ticket.global_state,
                [updates[cid].state for cid in outcome.valid], sigma=self.sigma,
                streams=self.streams, round_index=ticket.round_index,
                num_clients=len(self.client_ids))
            self.method.apply(self.model, aggregate)
            ticket.downlink = aggregate.downlink
            outcome.aggregated = True
        # Checkpoints, fingerprints and adapters hold every factor, whatever trained.
        self.method.end_round(self.model)
        # Instructions went out to every participant: their steps count either way.
        self.guard.commit(ticket.token)
        self.ledger.save(self.path(rd.LEDGER))
        self._record(ticket, outcome, updates)
        return outcome

    def _record(self, ticket: RoundTicket, outcome: RoundOutcome,
                updates: Mapping[str, ClientUpdate]) -> None:
        progress, config = self.progress, self.config
        outcome.bytes_up_by_client = {cid: payload_bytes(updates[cid].state)
                                      for cid in outcome.valid}
        outcome.bytes_down_by_client = {cid: progress["next_down_by_client"][cid]
                                        for cid in ticket.participants}
        outcome.bytes_up = sum(outcome.bytes_up_by_client.values())
        outcome.bytes_down = sum(outcome.bytes_down_by_client.values())
        evaluator = self.prepared.evaluator
        outcome.metrics = {f"validation_{name}": None for name in evaluator.metric_names}
        if outcome.aggregated:
            progress["fingerprint"] = frozen_fingerprint(self.model)
            save_file(self.method.checkpoint_tensors(self.model),
                      self.path(rd.CHECKPOINT) + ".tmp")
            os.replace(self.path(rd.CHECKPOINT) + ".tmp", self.path(rd.CHECKPOINT))
            progress["aggregated_rounds"] += 1
            progress["next_down_by_client"] = {
                cid: payload_bytes(self._sent(self.config, ticket.downlink, cid,
                                              self.client_ids))
                for cid in self.client_ids}
            result = evaluator.evaluate(self.model, "validation")
            outcome.metrics = {f"validation_{name}": result[name]
                               for name in evaluator.metric_names}
        else:
            progress["failed_rounds"].append(ticket.round_index + 1)
        progress.update(completed_rounds=ticket.round_index + 1,
                        bytes_up=progress["bytes_up"] + outcome.bytes_up,
                        bytes_down=progress["bytes_down"] + outcome.bytes_down)
        epsilon = (epsilon_report(self.path(rd.LEDGER), self.delta, self.config.accountant)
                   ["epsilon"] if self.config.private else math.inf)
        released = release.write_round(self.out, {
            "round": ticket.round_index + 1, "participants": outcome.participants,
            "aggregated": outcome.aggregated, "valid": outcome.valid,
            "dropped": outcome.dropped, "rejected": outcome.rejected, **outcome.metrics,
            "epsilon": epsilon, "bytes_up": outcome.bytes_up, "bytes_down": outcome.bytes_down,
            "bytes_up_by_client": outcome.bytes_up_by_client,
            "bytes_down_by_client": outcome.bytes_down_by_client,
            "round_time_s": time.time() - ticket.started,
            "elapsed_s": time.time() - self.started}, dp_level=config.dp_level)
        rd.write_json_atomic(self.path(rd.PROGRESS), progress)
        # Both drivers pass here: one line per round, built from the released record only.
        narration.say(narration.round_line(released, rounds=config.rounds,
                                           target_epsilon=config.epsilon))

    # ------------------------------------------------------------------ the end
    def stop(self, status: str, message: str) -> None:
        """End the run early (the driver's reason, e.g. an interrupt)."""
        self.status, self.message = status, message

    def finish(self) -> dict[str, Any]:
        """Evaluate the last aggregated model on the test split and write ``summary.json``."""
        config, progress, model = self.config, self.progress, self.model
        if self.status == "running":
            self.status = "completed"
        if progress["failed_rounds"] and self.status == "completed":
            self.message = (f"round(s) {progress['failed_rounds']} were not aggregated (see "
                            f"{rd.METRICS}); their steps are charged")
        if progress["aggregated_rounds"] > 0:
            self.method.restore(model, load_file(self.path(rd.CHECKPOINT)))
        test = self.prepared.evaluator.evaluate(model, "test")
        self.method.save_adapter(model, self.path(rd.FINAL_ADAPTER), sb_config(config),
                                 base_model=config.model)
        eps = (epsilon_report(self.path(rd.LEDGER), self.delta, config.accountant)
               if config.private else {"epsilon": math.inf, "delta": self.delta,
                                       "per_client_epsilon": {}})
        summary = {
            "status": self.status, "message": self.message, "engine": progress["engine"],
            "method": config.method,
            "partition": "pooled" if config.method_is_central else config.partition,
            "task": config.task,
            **{f"test_{name}": test[name]
               for name in (*self.prepared.evaluator.metric_names, "examples")},
            "rounds_completed": progress["completed_rounds"],
            "rounds_aggregated": progress["aggregated_rounds"],
            "rounds_failed": progress["failed_rounds"], "rounds_planned": config.rounds,
            "noise_multiplier": self.sigma, "privacy": eps, "target_epsilon": config.epsilon,
            "noise": config.noise,
            **({} if self.sigmas is None else {"noise_multipliers": dict(self.sigmas)}),
            **self.unit.summary(progress["engine"]),
            "bytes_setup": progress["bytes_setup"], "bytes_up": progress["bytes_up"],
            "bytes_down": progress["bytes_down"],
            "trainable_parameters": trainable_count(model),
            # RoLoRA trains half of its adapter per round: its noise has that dimension.
            "noised_parameters": self.method.noised_parameters(model),
            "clients": dict(self.prepared.sizes),
            "seed_mode": "seeded" if self.streams.seeded else "os-entropy",
            "label_names": list(self.prepared.evaluator.label_names),
            "wall_time_s": time.time() - self.started,
        }
        # Rounds charged but never completed (a crash inside a round): say so, and how to go on.
        summary.update(uncommitted_rounds=uncommitted_rounds(self.ledger),
                       message="; ".join(filter(None, [self.message, uncommitted_note(
                           self.ledger, self.out)])) or None)
        summary, operator = release.split_record(summary, dp_level=config.dp_level)
        if not self.unit.replies_are_releases:
            # Realised traffic would reveal the secret cohorts: publish its expectation.
            summary.update(bytes_basis="expected", **{
                f"bytes_{way}": release.expected_traffic(
                    progress["next_down_by_client"], participation=config.participation,
                    rounds=progress["completed_rounds"]) for way in ("up", "down")})
        release.append_operator(self.out, "summary", operator)
        self.operator = operator
        rd.write_json_atomic(self.path(rd.SUMMARY), summary)
        return summary
