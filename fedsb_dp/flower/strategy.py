"""The Fed-SB Strategy: the ledger, the budget guard and the aggregation of the Flower server.

Per round (the same order as the in-process engine):

1. :meth:`FedSBStrategy.configure_train` picks the participants, asks the budget guard to
   reserve their planned DP-SGD steps and saves the ledger — *before* any instruction leaves
   the server. A client that was sent instructions is charged whether or not it replies.
2. :meth:`FedSBStrategy.aggregate_train` sorts the replies: error replies and missing
   replies are *dropped* clients; replies that are malformed or inconsistent (wrong client
   id, frozen-factor fingerprint, keys, shapes, dtype, step count, privacy event) are
   *rejected*. Any rejection, or fewer than ``min_clients`` valid replies, means the round is
   not aggregated (R̄ stays as it was). Otherwise R̄ is the uniform mean of the valid replies
   (:func:`~fedsb_dp.federated.server.weighted_mean`, exact for Fed-SB). Either way the
   reservation is committed: the steps were released to whoever received instructions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from accounting import BudgetGuard, NonPrivateDpEvent, PrivacyLedger
from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated.client import LocalTrainingConfig
from fedsb_dp.federated.engine import round_participants
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.server import payload_bytes, validate_update, weighted_mean
from fedsb_dp.flower.common import SetupInfo, records_to_update, state_to_record
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What happened in one round (for metrics.jsonl; nothing private).

    Attributes:
        round_index: 0-based round.
        participants: Clients that were sent instructions (all charged).
        valid: Clients whose replies were aggregated (or would have been).
        dropped: Client → why no usable reply arrived (error reply, timeout).
        rejected: Client → why its reply was refused.
        aggregated: Whether R̄ was updated.
        bytes_up: Bytes of the valid replies' tensors.
        bytes_down: Bytes of R̄ sent to the participants.

    """

    round_index: int
    participants: list[str]
    valid: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False
    bytes_up: int = 0
    bytes_down: int = 0


class FedSBStrategy(Strategy):
    """Fed-SB with record-level DP on the Flower server.

    Args:
        config: The run's settings.
        setup: What every message tells clients (settings, seeds, labels).
        nodes: Client id → Flower node id (from the setup query).
        ledger: The run's ledger (its clients are the keys of ``nodes``).
        guard: The budget guard over ``ledger``.
        ledger_path: Where the ledger is saved after every reservation and commit.
        noise_multiplier: σ, calibrated once for the whole plan.
        fingerprint: Hash of the agreed frozen factors.
        local: The clients' local training settings (σ included).
        streams: The server's random streams (participation sampling).

    """

    def __init__(self, *, config: RunConfig, setup: SetupInfo, nodes: dict[str, int],
                 ledger: PrivacyLedger, guard: BudgetGuard, ledger_path: str,
                 noise_multiplier: float, fingerprint: str, local: LocalTrainingConfig,
                 streams: RandomStreams) -> None:
        self.config = config
        self.setup = setup
        self.nodes = dict(nodes)
        self.client_ids = sorted(nodes, key=lambda c: int(c.rsplit("-", 1)[1]))
        self.ledger = ledger
        self.guard = guard
        self.ledger_path = ledger_path
        self.noise_multiplier = noise_multiplier
        self.fingerprint = fingerprint
        self.local = local
        self.streams = streams
        self._round: dict[str, Any] | None = None
        self.last_outcome: RoundOutcome | None = None

    def _step_event(self, cid: str) -> Any:
        if not self.config.private:
            return NonPrivateDpEvent()
        return self.local.step_event(self.ledger.dataset_sizes[cid])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Reserve the round's steps in the ledger (saved), then build the instructions.

        Raises:
            accounting.BudgetExceededError: If the round would pass the target ε (nothing
                is reserved or sent).

        """
        round_index = server_round - 1
        chosen = round_participants(self.config, self.streams, round_index, self.client_ids)
        events = {cid: (self._step_event(cid), self.config.local_steps) for cid in chosen}
        token = self.guard.reserve_round(events, round_index=round_index)
        self.ledger.save(self.ledger_path)
        global_state = {k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}
        self._round = {"token": token, "events": events, "global_state": global_state,
                       "round_index": round_index}
        messages = []
        for cid in chosen:
            content = RecordDict({
                "arrays": state_to_record(global_state),
                "setup": self.setup.to_record(),
                "round": ConfigRecord({"round": round_index, "client-id": cid,
                                       "noise-multiplier": float(self.noise_multiplier),
                                       "target-delta": float(self.guard.delta),
                                       "fingerprint": self.fingerprint, **dict(config)}),
            })
            messages.append(Message(content=content, dst_node_id=self.nodes[cid],
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def _check_reply(self, reply: Message, cid: str) -> Any:
        assert self._round is not None
        update = records_to_update(reply.content)
        if update.client_id != cid:
            raise ConfigError(f"node {self.nodes[cid]} answered as {update.client_id!r}, it "
                              f"holds {cid!r}")
        expected_event = self._round["events"][cid][0].to_dict()
        if json.dumps(update.event.to_dict(), sort_keys=True) != json.dumps(
                expected_event, sort_keys=True):
            raise ConfigError(f"client {cid!r} reports event {update.event.to_dict()}, the "
                              f"ledger reserved {expected_event}")
        validate_update(update, global_state=self._round["global_state"],
                        fingerprint=self.fingerprint, expected_steps=self.config.local_steps)
        return update

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, average them if the round stands, commit the reservation."""
        if self._round is None or self._round["round_index"] != server_round - 1:
            raise FedSBError(f"aggregate_train({server_round}) without its configure_train")
        chosen = list(self._round["events"])
        by_node = {self.nodes[cid]: cid for cid in chosen}
        outcome = RoundOutcome(round_index=server_round - 1, participants=chosen)
        updates: dict[str, Any] = {}
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None or cid in updates or cid in outcome.rejected:
                logger.warning("ignoring a reply from node %s, not a participant of round %d "
                               "(or a duplicate)", reply.metadata.src_node_id, server_round)
                continue
            if reply.has_error():
                outcome.dropped[cid] = f"error reply: {reply.error.reason}"
                continue
            try:
                updates[cid] = self._check_reply(reply, cid)
            except FedSBError as exc:
                outcome.rejected[cid] = str(exc)
                logger.error("round %d: rejected the reply of %s: %s", server_round, cid, exc)
        for cid in chosen:
            if cid not in updates and cid not in outcome.rejected:
                outcome.dropped.setdefault(cid, "no reply before the round timeout")
        for cid, reason in outcome.dropped.items():
            logger.warning("round %d: %s dropped out (%s); its reserved steps stay charged",
                           server_round, cid, reason)
        outcome.valid = [cid for cid in chosen if cid in updates]
        aggregated = None
        if outcome.rejected:
            logger.error("round %d is not aggregated: %d reply(ies) rejected", server_round,
                         len(outcome.rejected))
        elif len(outcome.valid) < self.config.min_clients:
            logger.error("round %d is not aggregated: %d valid replies, min_clients=%d",
                         server_round, len(outcome.valid), self.config.min_clients)
        else:
            aggregated = weighted_mean([updates[cid].state for cid in outcome.valid])
            outcome.aggregated = True
        # Instructions went out to every participant: their steps count either way.
        self.guard.commit(self._round["token"])
        self.ledger.save(self.ledger_path)
        outcome.bytes_up = sum(payload_bytes(updates[cid].state) for cid in outcome.valid)
        outcome.bytes_down = payload_bytes(self._round["global_state"]) * len(chosen)
        self.last_outcome = outcome
        self._round = None
        metrics = MetricRecord({"aggregated": int(outcome.aggregated),
                                "valid": len(outcome.valid), "dropped": len(outcome.dropped),
                                "rejected": len(outcome.rejected)})
        return (state_to_record(aggregated) if aggregated is not None else None), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No client-side evaluation: a metric on private records would be a release."""
        return []

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the strategy's settings."""
        logger.info("FedSBStrategy: %d clients, %d rounds × %d local steps, σ=%.4g, "
                    "min_clients=%d", len(self.client_ids), self.config.rounds,
                    self.config.local_steps, self.noise_multiplier, self.config.min_clients)

    def run_rounds(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        *,
        timeout: float,
        on_round: Callable[[RoundOutcome, ArrayRecord], None] | None = None,
    ) -> tuple[ArrayRecord, str, str | None]:
        """The round loop of :meth:`Strategy.start`, stopping cleanly at the budget.

        Args:
            grid: Flower's grid.
            initial_arrays: R⁰ and the initial head.
            timeout: Seconds to wait for a round's replies.
            on_round: Called after every round with its outcome and the current R̄.

        Returns:
            The final arrays, the status (``"completed"`` or ``"stopped-budget"``) and a
            message.

        """
        from accounting import BudgetExceededError

        self.summary()
        arrays = initial_arrays
        for server_round in range(1, self.config.rounds + 1):
            try:
                messages = list(self.configure_train(server_round, arrays, ConfigRecord(), grid))
            except BudgetExceededError as exc:
                logger.warning("stopping before round %d: %s", server_round, exc)
                return arrays, "stopped-budget", str(exc)
            replies = grid.send_and_receive(messages, timeout=timeout)
            new_arrays, _ = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            if on_round is not None:
                assert self.last_outcome is not None
                on_round(self.last_outcome, arrays)
        return arrays, "completed", None
