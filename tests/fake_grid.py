"""A fake Flower grid that delivers messages to the real ClientApp handlers in-process.

Shared by the Flower strategy tests and the driver conformance tests: no Ray, no SuperLink,
but every message goes through the real ``handle_query`` / ``handle_train`` and the real
ServerApp code.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedsb_dp.flower import client_app


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class FakeGrid:
    """Delivers messages to in-process ClientApp handlers; ``faults`` maps
    (round, client index) → "raise" (the client dies) or a tampering function."""

    def __init__(self, num_nodes: int, faults: dict | None = None, *,
                 state_dir: str | None = None, node_config: dict | None = None) -> None:
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.faults = faults or {}
        self.sent: list[tuple[str, int]] = []
        self.state_dir = state_dir
        self.node_config = node_config or {}

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            index = self.node_ids.index(node)
            kind = message.metadata.message_type
            self.sent.append((kind, index))
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"partition-id": index,
                                           "num-partitions": len(self.node_ids),
                                           **({"node-state-dir": self.state_dir}
                                              if self.state_dir else {}),
                                           **self.node_config})
            if kind == "query":
                replies.append(client_app.handle_query(message, context))
                continue
            fault = self.faults.get((int(message.metadata.group_id), index))
            if fault == "raise":
                replies.append(Message(Error(code=1, reason="client crashed mid-round"),
                                       reply_to=message))
                continue
            try:
                reply = client_app.handle_train(message, context)
            except Exception as exc:  # as Flower does: the exception becomes an error reply
                replies.append(Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"),
                                       reply_to=message))
                continue
            replies.append(fault(reply) if fault else reply)
        return replies
