"""The Fed-SB ClientApp: one data holder's side of the federation.

Each SuperNode is started with ``--node-config "partition-id=i num-partitions=N"`` (and,
for real data holders, ``data-path=/path/to/own.csv``; ``device=cuda`` to train on this
node's GPU, default ``auto``). On ``query`` the node reports its
client id, Nᵢ and the fingerprint of the B, A it derived itself; on ``train`` it checks that
the server agreed on the same fingerprint, lets its own
:class:`~fedsb_dp.federated.node_policy.NodePrivacyPolicy` (policy keys in the node config)
check the announced plan and σ and reserve the round in the node's own ledger, carries out
the protocol's instruction with :func:`~fedsb_dp.federated.client.train_instruction` (Opacus
DP-SGD over R and the head) and sends back only its R, head and privacy events.

The model and the client's data are cached per process, keyed by everything that defines
them, because the simulation engine keeps ClientApp processes alive between messages (the
deployment engine starts a fresh process per message, where the cache is simply empty).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from opacus import GradSampleModule

from fedsb_dp.adapters import frozen_fingerprint
from fedsb_dp.adapters.inject import train_only
from fedsb_dp.errors import AdapterMismatchError, ConfigError
from fedsb_dp.federated.client import DPClient, train_instruction
from fedsb_dp.federated.node_policy import NodePrivacyPolicy, NodeRefusalError, NodeReservation
from fedsb_dp.federated.privacy_unit import local_config
from fedsb_dp.federated.protocol import Instruction
from fedsb_dp.federated.setup import client_id, node_client
from fedsb_dp.flower.common import (
    SetupInfo,
    announced_plan,
    build_model,
    load_base,
    records_to_instruction,
    update_to_records,
)
from fedsb_dp.rng import RandomStreams

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_MAX_CACHED_CLIENTS = 8
#: A node's own consent to client-level DP, for nodes whose node config cannot carry it.
ACCEPT_CLIENT_LEVEL_ENV = "FEDSB_DP_ACCEPT_CLIENT_LEVEL"
_models: OrderedDict[str, tuple[Any, GradSampleModule, str]] = OrderedDict()
_clients: OrderedDict[tuple[str, int, str], DPClient] = OrderedDict()


def _node_partition(context: Context) -> tuple[int, int, str | None]:
    node = context.node_config
    try:
        partition_id = int(node["partition-id"])
        num_partitions = int(node["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            "start every SuperNode with --node-config \"partition-id=<i> "
            f"num-partitions=<N>\" (got node config {dict(node)!r})") from exc
    data_path = node.get("data-path")
    return partition_id, num_partitions, str(data_path) if data_path else None


def _model(setup: SetupInfo, context: Context) -> tuple[Any, GradSampleModule, str]:
    key = setup.key()
    if key not in _models:
        _models.clear()  # one run at a time per process: keep a single model in memory
        # The device is this node's choice (node config), never the server's.
        loaded = build_model(setup.config, num_labels=len(setup.label_names),
                             init_seed=setup.init_seed,
                             device=str(context.node_config.get("device", "auto")))
        private = GradSampleModule(loaded.model, batch_first=True, loss_reduction="mean")
        _models[key] = (loaded, private, frozen_fingerprint(loaded.model))
    return _models[key]


def _client(setup: SetupInfo, context: Context, tokenizer: object) -> DPClient:
    partition_id, num_partitions, data_path = _node_partition(context)
    key = (setup.key(), partition_id, data_path or "")
    if key not in _clients:
        _clients[key] = node_client(
            setup.config, partition_id=partition_id, num_partitions=num_partitions,
            partition_seed=setup.partition_seed, label_names=setup.label_names,
            tokenizer=tokenizer, data_path=data_path)
        while len(_clients) > _MAX_CACHED_CLIENTS:
            _clients.popitem(last=False)
    return _clients[key]


def handle_query(message: Message, context: Context) -> Message:
    """Setup: report client id, Nᵢ (public) and the fingerprint of the derived factors."""
    setup = SetupInfo.from_record(message.content.config_records["setup"])
    loaded, _, fingerprint = _model(setup, context)
    client = _client(setup, context, loaded.tokenizer)
    reply = RecordDict({"client": ConfigRecord({
        "client-id": client.client_id, "num-records": client.num_records,
        "fingerprint": fingerprint})})
    return Message(reply, reply_to=message)


def handle_train(message: Message, context: Context) -> Message:
    """One round: carry out the server's instruction and return R, head and events.

    Raises:
        AdapterMismatchError: If the server's fingerprint differs from this node's tensors.
        ConfigError: If the server addressed another client id or sent a malformed message.

    """
    content = message.content
    setup = SetupInfo.from_record(content.config_records["setup"])
    instruction, base = records_to_instruction(content)
    loaded, private_model, _ = _model(setup, context)
    client = _client(setup, context, loaded.tokenizer)
    if instruction.client_id != client.client_id:
        raise ConfigError(f"the server addressed {instruction.client_id!r}, this node "
                          f"holds {client.client_id!r}")
    load_base(loaded.model, base)
    # What trains is what the server sent (RoLoRA freezes one factor per round), so the
    # fingerprint of the frozen tensors is taken with the round's trainable set.
    with train_only(loaded.model, instruction.state):
        fingerprint = frozen_fingerprint(loaded.model)
        if instruction.fingerprint != fingerprint:
            raise AdapterMismatchError(
                f"{client.client_id}: the server's frozen tensors "
                f"{instruction.fingerprint[:16]}… differ from this node's {fingerprint[:16]}…")
        reservation = _admit(setup, instruction, content, context, client)
        # The run's named streams at this client's index: a seeded run draws what the
        # in-process engine draws; unseeded, every stream comes from this node's OS entropy.
        update = train_instruction(client, private_model, instruction,
                                   RandomStreams(setup.config.seed))
    if reservation is not None:
        NodePrivacyPolicy.commit(reservation)
    return Message(RecordDict(update_to_records(update)), reply_to=message)


def _admit(setup: SetupInfo, instruction: Instruction, content: Any, context: Context,
           client: DPClient) -> NodeReservation | None:
    """The node's own privacy check of an instruction, before a record is touched.

    Record level: the node's :class:`NodePrivacyPolicy` recomputes σ for the announced plan
    on its own Nᵢ, refuses anything weaker, and reserves the round in the node's own ledger.
    Client level: the node trains without noise and the server sees its raw update, which
    it accepts only when its operator opted in: node config ``accept-client-level=true``, or
    the node's environment variable ``FEDSB_DP_ACCEPT_CLIENT_LEVEL=1`` (what the simulation
    engine sets, since there one operator runs every node).

    Raises:
        NodeRefusalError: Nothing is trained or charged; Flower returns an error reply.

    """
    if setup.config.dp_level == "client":
        consent = context.node_config.get("accept-client-level",
                                          os.environ.get(ACCEPT_CLIENT_LEVEL_ENV, ""))
        if str(consent).lower() not in ("true", "1", "yes"):
            raise NodeRefusalError(
                f"{client.client_id} refuses client-level DP: the server would see its raw "
                "update; start the node with node config accept-client-level=true (or "
                f"{ACCEPT_CLIENT_LEVEL_ENV}=1 in its environment) to trust it")
        return None
    _, _, data_path = _node_partition(context)
    policy = NodePrivacyPolicy.from_node_config(
        context.node_config, client_id=client.client_id, run_id=context.run_id,
        data_path=data_path)
    plan = announced_plan(setup, content.config_records["round"])
    expected = local_config(setup.config, plan.noise_multiplier)
    if instruction.local != expected:
        raise NodeRefusalError(f"{client.client_id} refuses local settings {instruction.local}: "
                               f"the announced plan implies {expected}")
    return policy.begin_round(plan, client_id=client.client_id,
                              num_records=client.num_records,
                              round_index=instruction.round_index)


app = ClientApp()
app.query()(handle_query)
app.train()(handle_train)

__all__ = ["app", "client_id", "handle_query", "handle_train"]
