"""The ServerApp: the Flower driver's setup around the round protocol.

Setup (before anything private is released):

1. Check the settings, derive the public seeds (partition, random factors) from the run's
   seed (OS entropy when unseeded), load the evaluator's validation/test split and build the
   model with the method's data-free adapters.
2. Wait for ``clients`` SuperNodes and send each a ``query``: every node derives the
   adapters itself and reports its client id, Nᵢ (public: it sets qᵢ = b/Nᵢ) and the
   fingerprint of its frozen tensors, which must equal the server's bit for bit.
3. Hand everything to :meth:`RoundProtocol.create` (δ check, σ calibrated once, run
   directory) — or, with ``resume``, reopen the run with :meth:`RoundProtocol.resume`.

Then :class:`~fedsb_dp.flower.strategy.ProtocolStrategy` carries the protocol's rounds as
messages, and :meth:`RoundProtocol.finish` writes the summary: the run directory is the
in-process engine's, file for file.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsb_dp import narration
from fedsb_dp.adapters import frozen_fingerprint
from fedsb_dp.console import quiet_expected_warnings, show_narration
from fedsb_dp.errors import AdapterMismatchError, ConfigError, FedSBError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.protocol import Prepared, RoundProtocol
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.setup import (
    Evaluator,
    client_id,
    inject,
    load_base_model,
    load_data,
    make_method,
)
from fedsb_dp.flower.common import SetupInfo, check_supported
from fedsb_dp.flower.run_config import FlowerOptions, from_flower
from fedsb_dp.flower.strategy import ProtocolStrategy
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)

ENGINE = "flower"


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once ``count`` SuperNodes are connected.

    Raises:
        ConfigError: If fewer than ``count`` connect within ``timeout`` seconds.

    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise ConfigError(f"{len(nodes)} SuperNode(s) connected within {timeout:.0f} s, "
                              f"the run needs clients={count}")
        time.sleep(1.0)


def query_clients(grid: Grid, setup: SetupInfo, fingerprint: str, *, wait_timeout: float,
                  timeout: float) -> tuple[dict[str, int], dict[str, int]]:
    """Wait for the nodes, ask each for its client id, Nᵢ and factor fingerprint; check them.

    Returns:
        Client id → node id, and client id → Nᵢ.

    Raises:
        AdapterMismatchError: If a node derived other frozen factors.
        ConfigError: If ids are missing, duplicated or a node failed.

    """
    node_ids = wait_for_nodes(grid, setup.config.clients, wait_timeout)
    messages = [Message(content=RecordDict({"setup": setup.to_record()}), dst_node_id=node,
                        message_type=MessageType.QUERY, group_id="setup") for node in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    nodes: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise ConfigError(f"node {node} failed the setup query: {reply.error.reason}")
        try:
            record = reply.content.config_records["client"]
            cid, size, theirs = (str(record["client-id"]), int(record["num-records"]),
                                 str(record["fingerprint"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"node {node}: malformed setup reply ({exc!r})") from exc
        if theirs != fingerprint:
            raise AdapterMismatchError(
                f"{cid} (node {node}) derived frozen factors {theirs[:16]}…, the server "
                f"{fingerprint[:16]}…; every node needs the same model files and settings")
        if cid in nodes:
            raise ConfigError(f"nodes {nodes[cid]} and {node} both hold {cid}: give every "
                              "SuperNode a distinct partition-id")
        nodes[cid], sizes[cid] = node, size
    expected = [client_id(i) for i in range(setup.config.clients)]
    if sorted(nodes) != sorted(expected):
        raise ConfigError(f"setup replies came from {sorted(nodes)}, the run needs exactly "
                          f"{expected} (no reply within {timeout:.0f} s counts as missing)")
    return {cid: nodes[cid] for cid in expected}, {cid: sizes[cid] for cid in expected}


def _prepare(config: RunConfig, progress: dict[str, Any] | None,
             ) -> tuple[SetupInfo, Any, Evaluator]:
    """The evaluator's data, the public seeds and the model (adapters injected when new)."""
    streams = RandomStreams(config.seed)
    narration.say(f"loading data {config.dataset} …")
    data = load_data(config)
    seeds = ((progress["partition_seed"], progress["init_seed"]) if progress else
             (streams.integer("partition"), streams.integer("init-factors")))
    setup = SetupInfo(config=config, partition_seed=seeds[0], init_seed=seeds[1],
                      label_names=tuple(data.label_names))
    narration.say(f"loading model {config.model} …")
    loaded = load_base_model(config, num_labels=data.num_labels)
    return setup, loaded, Evaluator.build(config, data, loaded.tokenizer)


def run_server(grid: Grid, config: RunConfig, options: FlowerOptions) -> dict[str, Any]:
    """The whole server side of a Flower run (new, or resumed with ``options.resume``)."""
    out = os.path.abspath(config.out or rd.default_run_dir())
    progress = None
    if options.resume:
        config, progress = RoundProtocol.saved(out)
    else:
        config = RunConfig.from_dict({**config.to_dict(), "out": out})
        rd.check_new_run_dir(out)
    check_supported(config)
    setup, loaded, evaluator = _prepare(config, progress)
    if progress is None:
        # Data-free adapters now, so the nodes' fingerprints can be checked before any
        # file is written or anything is charged.
        inject(config, make_method(config), loaded.model, init_seed=setup.init_seed)
        init_fingerprint = frozen_fingerprint(loaded.model)
    else:
        init_fingerprint = progress["init_fingerprint"]
    nodes, sizes = query_clients(grid, setup, init_fingerprint,
                                 wait_timeout=options.node_wait_timeout,
                                 timeout=options.round_timeout)
    prepared = Prepared(model=loaded.model, tokenizer=loaded.tokenizer,
                        resolved_path=loaded.resolved_path, sizes=sizes, evaluator=evaluator)
    if progress is None:
        protocol = RoundProtocol.create(config, prepared, engine=ENGINE,
                                        partition_seed=setup.partition_seed,
                                        init_seed=setup.init_seed)
    else:
        if sizes != progress["sizes"]:
            raise ConfigError(f"the nodes now hold {sizes} records, the run was planned for "
                              f"{progress['sizes']}; resume with the same nodes and data")
        protocol = RoundProtocol.resume(out, prepared)
    strategy = ProtocolStrategy(protocol=protocol, setup=setup, nodes=nodes)
    strategy.run_rounds(grid, timeout=options.round_timeout)
    return protocol.finish()


def make_server_app(config: RunConfig | None = None,
                    options: FlowerOptions | None = None) -> ServerApp:
    """A ServerApp for ``config``, or one that reads the Flower run config (``flwr run``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            # Started by Flower (``flwr run``): this process is ours to configure, as the CLI
            # configures its own; a caller that passes ``config`` keeps its logging as it is.
            quiet_expected_warnings(transformers_reports=False)
            show_narration()  # the same status and per-round lines as fedsb-dp run
            run, opts = from_flower(context.run_config)
        else:
            run, opts = config, options or FlowerOptions()
        try:
            summary = run_server(grid, run, opts)
        except FedSBError as exc:
            logger.error("fedsb-dp: %s", exc)
            raise
        logger.warning("fedsb-dp run %s: %s, ε = %s", summary["status"],
                       run.out or "(run directory in summary)", summary["privacy"]["epsilon"])

    return server_app


app = make_server_app()
