"""The Fed-SB ClientApp: one data holder's side of the federation.

Each SuperNode is started with ``--node-config "partition-id=i num-partitions=N"`` (and,
for real data holders, ``data-path=/path/to/own.csv``). On ``query`` the node reports its
client id, Nᵢ and the fingerprint of the B, A it derived itself; on ``train`` it checks that
the server agreed on the same fingerprint, lets its own
:class:`~fedsb_dp.federated.node_policy.NodePrivacyPolicy` (policy keys in the node config)
check the announced plan and σ and reserve the round in the node's own ledger, runs
:meth:`~fedsb_dp.federated.client.DPClient.train_round` (Opacus DP-SGD over R and the head)
from the received R̄ and sends back only its R, head and privacy events.

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
from fedsb_dp.errors import AdapterMismatchError, ConfigError
from fedsb_dp.federated.client import DPClient
from fedsb_dp.federated.engine import _local_config
from fedsb_dp.federated.node_policy import NodePrivacyPolicy
from fedsb_dp.flower.common import (
    SetupInfo,
    announced_plan,
    build_model,
    client_id,
    load_client,
    record_to_state,
    update_to_records,
)
from fedsb_dp.rng import RandomStreams

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_MAX_CACHED_CLIENTS = 8
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


def _model(setup: SetupInfo) -> tuple[Any, GradSampleModule, str]:
    key = setup.key()
    if key not in _models:
        _models.clear()  # one run at a time per process: keep a single model in memory
        loaded = build_model(setup.config, num_labels=len(setup.label_names),
                             init_seed=setup.init_seed)
        private = GradSampleModule(loaded.model, batch_first=True, loss_reduction="mean")
        _models[key] = (loaded, private, frozen_fingerprint(loaded.model))
    return _models[key]


def _client(setup: SetupInfo, context: Context, tokenizer: object) -> DPClient:
    partition_id, num_partitions, data_path = _node_partition(context)
    key = (setup.key(), partition_id, data_path or "")
    if key not in _clients:
        _clients[key] = load_client(
            setup.config, partition_id=partition_id, num_partitions=num_partitions,
            partition_seed=setup.partition_seed, label_names=setup.label_names,
            tokenizer=tokenizer, data_path=data_path)
        while len(_clients) > _MAX_CACHED_CLIENTS:
            _clients.popitem(last=False)
    return _clients[key]


def handle_query(message: Message, context: Context) -> Message:
    """Setup: report client id, Nᵢ (public) and the fingerprint of the derived factors."""
    setup = SetupInfo.from_record(message.content.config_records["setup"])
    loaded, _, fingerprint = _model(setup)
    client = _client(setup, context, loaded.tokenizer)
    reply = RecordDict({"client": ConfigRecord({
        "client-id": client.client_id, "num-records": client.num_records,
        "fingerprint": fingerprint})})
    return Message(reply, reply_to=message)


def handle_train(message: Message, context: Context) -> Message:
    """One round: start from R̄, run the planned DP-SGD steps, return R, head and events.

    Raises:
        AdapterMismatchError: If the server's fingerprint differs from this node's factors.
        ConfigError: If the server addressed another client id or sent a malformed message.
        NodeRefusalError: If the node's own policy refuses the plan or the round (nothing
            is trained or charged; Flower sends the message back as an error reply).

    """
    content = message.content
    setup = SetupInfo.from_record(content.config_records["setup"])
    round_record = content.config_records["round"]
    loaded, private_model, fingerprint = _model(setup)
    client = _client(setup, context, loaded.tokenizer)
    if str(round_record["client-id"]) != client.client_id:
        raise ConfigError(f"the server addressed {round_record['client-id']!r}, this node "
                          f"holds {client.client_id!r}")
    if str(round_record["fingerprint"]) != fingerprint:
        raise AdapterMismatchError(
            f"{client.client_id}: the server's factors {str(round_record['fingerprint'])[:16]}… "
            f"differ from this node's {fingerprint[:16]}…")
    round_index = int(round_record["round"])
    # The node owns its privacy: it checks the server's plan and σ against its own policy
    # and reserves the round in its own ledger before a single record is touched.
    _, _, data_path = _node_partition(context)
    policy = NodePrivacyPolicy.from_node_config(
        context.node_config, client_id=client.client_id, run_id=context.run_id,
        data_path=data_path)
    plan = announced_plan(setup, round_record)
    reservation = policy.begin_round(plan, client_id=client.client_id,
                                     num_records=client.num_records, round_index=round_index)
    local = _local_config(setup.config, plan.noise_multiplier)
    # Same named streams and indices as the in-process engine, so a seeded run draws the
    # same batches and noise; unseeded, every stream comes from this node's OS entropy.
    streams = RandomStreams(setup.config.seed)
    index = int(client.client_id.rsplit("-", 1)[1])
    update = client.train_round(
        private_model, record_to_state(content.array_records["arrays"]), local,
        noise_generator=streams.torch("noise", round_index, index),
        sampling_generator=streams.torch("poisson", round_index, index),
        dropout_seed=streams.integer("dropout", round_index, index),
    )
    policy.commit(reservation)
    return Message(RecordDict(update_to_records(update)), reply_to=message)


app = ClientApp()
app.query()(handle_query)
app.train()(handle_train)

__all__ = ["app", "client_id", "handle_query", "handle_train"]
