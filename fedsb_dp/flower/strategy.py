"""The Flower Strategy: the round protocol's instructions as messages, replies as updates.

:meth:`ProtocolStrategy.configure_train` asks the
:class:`~fedsb_dp.federated.protocol.RoundProtocol` to configure the round (the ledger is
reserved and saved before any message exists) and turns each instruction into a ``train``
message; :meth:`ProtocolStrategy.aggregate_train` turns the replies into updates (an error
reply or a reply that cannot be parsed becomes a reason) and hands them to the protocol,
which validates, aggregates and commits. Nothing about a round is decided here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsb_dp.errors import FedSBError
from fedsb_dp.federated.protocol import (
    ClientReply,
    NoUpdate,
    RoundOutcome,
    RoundProtocol,
    RoundTicket,
)
from fedsb_dp.flower.common import (
    SetupInfo,
    instruction_to_records,
    records_to_update,
    state_to_record,
)

logger = logging.getLogger(__name__)


class ProtocolStrategy(Strategy):
    """A Flower strategy that delegates every round decision to a :class:`RoundProtocol`.

    Args:
        protocol: The run's protocol (created or resumed by the ServerApp).
        setup: What every message tells the nodes (settings, seeds, labels).
        nodes: Client id → Flower node id (from the setup query).

    """

    def __init__(self, *, protocol: RoundProtocol, setup: SetupInfo,
                 nodes: dict[str, int]) -> None:
        self.protocol = protocol
        self.setup = setup
        self.nodes = dict(nodes)
        self._ticket: RoundTicket | None = None
        self.last_outcome: RoundOutcome | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Reserve the round in the ledger (saved), then one ``train`` message per participant.

        Returns nothing when the run is over (all rounds done or the budget reached).
        """
        del arrays, config, grid  # the protocol holds the global state
        ticket = self.protocol.configure_round()
        self._ticket = ticket
        if ticket is None:
            return []
        messages = []
        for cid, instruction in ticket.instructions.items():
            content = RecordDict({"setup": self.setup.to_record(),
                                  **instruction_to_records(instruction, ticket.base,
                                                         target_delta=self.protocol.delta)})
            messages.append(Message(content=content, dst_node_id=self.nodes[cid],
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def _replies(self, replies: Iterable[Message]) -> dict[str, ClientReply]:
        assert self._ticket is not None
        by_node = {self.nodes[cid]: cid for cid in self._ticket.participants}
        out: dict[str, ClientReply] = {}
        for reply in replies:
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None or cid in out:
                logger.warning("ignoring a reply from node %s, not a participant of this round "
                               "(or a duplicate)", reply.metadata.src_node_id)
                continue
            if reply.has_error():
                out[cid] = NoUpdate(f"error reply: {reply.error.reason}")
                continue
            try:
                out[cid] = records_to_update(reply.content)
            except FedSBError as exc:
                out[cid] = NoUpdate(str(exc), malformed=True)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the replies to the protocol; return the new global state if it aggregated."""
        ticket = self._ticket
        if ticket is None or ticket.round_index != server_round - 1:
            raise FedSBError(f"aggregate_train({server_round}) without its configure_train")
        outcome = self.protocol.aggregate_round(ticket, self._replies(replies))
        self.last_outcome, self._ticket = outcome, None
        metrics = MetricRecord({"aggregated": int(outcome.aggregated),
                                "valid": len(outcome.valid), "dropped": len(outcome.dropped),
                                "rejected": len(outcome.rejected)})
        arrays = (state_to_record(self.protocol.method.checkpoint_tensors(self.protocol.model))
                  if outcome.aggregated else None)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No client-side evaluation: a metric on private records would be a release."""
        return []

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the run's plan."""
        config = self.protocol.config
        logger.info("ProtocolStrategy: %s, %d clients, %d rounds × %d local steps, σ=%s",
                    config.method, len(self.nodes), config.rounds, config.local_steps,
                    f"{self.protocol.sigma:.4g}" if self.protocol.sigmas is None else
                    "per client " + ", ".join(f"{c} {s:.4g}"
                                              for c, s in self.protocol.sigmas.items()))

    def run_rounds(self, grid: Grid, *, timeout: float) -> None:
        """The round loop of :meth:`Strategy.start`, until the protocol says the run is over."""
        self.summary()
        server_round = self.protocol.progress["completed_rounds"]
        while not self.protocol.done:
            server_round += 1
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(),
                                                 grid))
            if self._ticket is None:
                break
            replies = grid.send_and_receive(messages, timeout=timeout)
            self.aggregate_train(server_round, replies)
