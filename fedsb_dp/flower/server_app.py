"""The Fed-SB ServerApp: setup, calibration, the round loop and the run directory.

Setup (before anything private is released):

1. Check the settings, derive the public seeds (partition, random-orthonormal factors) from
   the run's seed (OS entropy when unseeded), load the evaluator's validation/test split and
   build the model with the data-free B, A, R⁰.
2. Wait for ``clients`` SuperNodes and send each a ``query``: every node derives the factors
   itself and reports its client id, Nᵢ (public: it sets qᵢ = b/Nᵢ) and the factors'
   fingerprint, which must equal the server's bit for bit.
3. Check δ < 1/N_total, calibrate σ once for the whole plan, write ``config.json``,
   ``provenance.json``, ``ledger.json``, ``init_adapter/`` and ``progress.json``.

Then :class:`~fedsb_dp.flower.strategy.FedSBStrategy` runs the rounds, and the server writes
``metrics.jsonl``, ``checkpoint.safetensors``, ``final_adapter/`` and ``summary.json`` (ε
recomputed from the saved ledger) — the in-process engine's layout.
"""

from __future__ import annotations

import logging
import math
import os
import time
import types
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from accounting import (
    BudgetGuard,
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_delta,
    default_delta,
)
from fedsb_dp.adapters import frozen_fingerprint, save_sb_adapter, trainable_state
from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.errors import AdapterMismatchError, ConfigError, FedSBError
from fedsb_dp.federated import release
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.client import sampling_probability
from fedsb_dp.federated.engine import _local_config, _plan, epsilon_report
from fedsb_dp.federated.evaluation import evaluate_classifier
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.flower.common import (
    SetupInfo,
    build_model,
    check_supported,
    client_id,
    record_to_state,
    sb_config,
    state_to_record,
)
from fedsb_dp.flower.run_config import FlowerOptions, from_flower
from fedsb_dp.flower.strategy import FedSBStrategy, RoundOutcome
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


def run_server(grid: Grid, config: RunConfig, options: FlowerOptions) -> dict[str, Any]:
    """The whole server side of a Flower run; returns the summary written to disk."""
    started = time.time()
    # dp_accounting's RDP cross-check warns per skipped order at small σ (as in the CLI).
    logging.getLogger("absl").setLevel(logging.ERROR)
    check_supported(config)
    out = os.path.abspath(config.out or rd.default_run_dir())
    config = RunConfig.from_dict({**config.to_dict(), "out": out})
    paths = {name: os.path.join(out, name) for name in (
        rd.CONFIG, rd.LEDGER, rd.METRICS, rd.PROGRESS, rd.PROVENANCE, rd.INIT_ADAPTER,
        rd.CHECKPOINT, rd.FINAL_ADAPTER, rd.SUMMARY)}
    rd.check_new_run_dir(out)
    streams = RandomStreams(config.seed)
    setup_data = load_text_classification(
        config.dataset, text_column=config.text_column,
        text_pair_column=config.text_pair_column, label_column=config.label_column,
        max_train_records=config.max_train_records)
    setup = SetupInfo(config=config, partition_seed=streams.integer("partition"),
                      init_seed=streams.integer("init-factors"),
                      label_names=tuple(setup_data.label_names))
    loaded = build_model(config, num_labels=len(setup.label_names), init_seed=setup.init_seed)
    model = loaded.model
    fingerprint = frozen_fingerprint(model)
    nodes, sizes = query_clients(grid, setup, fingerprint,
                                 wait_timeout=options.node_wait_timeout,
                                 timeout=options.round_timeout)

    n_total = sum(sizes.values())
    delta = config.delta if config.delta is not None else default_delta(n_total)
    if config.private:
        check_delta(delta, n_total=n_total, allow_large=config.allow_large_delta)
    for size in sizes.values():
        sampling_probability(config.batch_size, size)
    # _plan reads only each client's Nᵢ; the nodes reported theirs in the setup query.
    plan_view = types.SimpleNamespace(clients={
        cid: types.SimpleNamespace(num_records=n) for cid, n in sizes.items()})
    sigma = (calibrate_noise_multiplier(
        target_epsilon=config.epsilon, target_delta=delta, plan=_plan(config, plan_view),
        accountant=config.accountant).noise_multiplier if config.private else 0.0)

    rd.claim_new_run_dir(out)
    rd.write_json_atomic(paths[rd.CONFIG], {"config": config.to_dict(),
                                            "digest": config.digest(), "engine": ENGINE})
    rd.write_json_atomic(paths[rd.PROVENANCE],
                         {**rd.provenance(config.digest(), seeded=streams.seeded),
                          "engine": ENGINE})
    ledger = PrivacyLedger(
        unit=config.dp_level, dataset_sizes=sizes, target_epsilon=config.epsilon,
        target_delta=delta, allow_large_delta=config.allow_large_delta,
        metadata={"seed_mode": "seeded" if streams.seeded else "os-entropy",
                  "noise_is_release": not streams.seeded, "sampling": "poisson",
                  "noise_multiplier": sigma, "max_grad_norm": config.max_grad_norm,
                  "method": config.method,
                  "dp_level": config.dp_level})
    ledger.save(paths[rd.LEDGER])
    sb = sb_config(config)
    save_sb_adapter(model, paths[rd.INIT_ADAPTER], sb, base_model=config.model)
    # B and A never travel: every node derives them, so the one-time setup cost is zero.
    state = {"completed_rounds": 0, "aggregated_rounds": 0, "failed_rounds": [],
             "partition_seed": setup.partition_seed, "init_seed": setup.init_seed,
             "noise_multiplier": sigma, "fingerprint": fingerprint, "bytes_setup": 0,
             "bytes_up": 0, "bytes_down": 0, "engine": ENGINE}
    rd.write_json_atomic(paths[rd.PROGRESS], state)

    local = _local_config(config, sigma)
    guard = BudgetGuard(ledger, target_epsilon=config.epsilon if config.private else math.inf,
                        delta=delta, accountant=config.accountant)
    strategy = FedSBStrategy(config=config, setup=setup, nodes=nodes, ledger=ledger,
                             guard=guard, ledger_path=paths[rd.LEDGER], noise_multiplier=sigma,
                             fingerprint=fingerprint, local=local, streams=streams)
    collate = make_collate(loaded.tokenizer)
    validation, test = setup_data.validation, setup_data.test
    if config.max_eval_records is not None:
        validation = validation.head(config.max_eval_records)
        test = test.head(config.max_eval_records)
    validation = TokenizedDataset(validation, loaded.tokenizer, max_length=config.max_length)
    test = TokenizedDataset(test, loaded.tokenizer, max_length=config.max_length)
    num_labels = len(setup.label_names)
    round_times: list[float] = []
    round_started = [time.time()]

    def on_round(outcome: RoundOutcome, arrays: Any) -> None:
        metrics: dict[str, Any] = {"validation_accuracy": None, "validation_loss": None,
                                   "validation_macro_f1": None}
        if outcome.aggregated:
            aggregated = record_to_state(arrays)
            set_trainable_state(model, aggregated)
            save_file({k: v.contiguous() for k, v in aggregated.items()},
                      paths[rd.CHECKPOINT] + ".tmp")
            os.replace(paths[rd.CHECKPOINT] + ".tmp", paths[rd.CHECKPOINT])
            result = evaluate_classifier(model, validation, collate, num_labels=num_labels)
            metrics = {"validation_accuracy": result["accuracy"],
                       "validation_loss": result["loss"],
                       "validation_macro_f1": result["macro_f1"]}
            state["aggregated_rounds"] += 1
        else:
            state["failed_rounds"].append(outcome.round_index + 1)
        state.update(completed_rounds=outcome.round_index + 1,
                     bytes_up=state["bytes_up"] + outcome.bytes_up,
                     bytes_down=state["bytes_down"] + outcome.bytes_down)
        eps = (epsilon_report(paths[rd.LEDGER], delta, config.accountant)
               if config.private else {"epsilon": math.inf})
        now = time.time()
        round_times.append(now - round_started[0])
        release.write_round(out, {
            "round": outcome.round_index + 1, "participants": outcome.participants,
            "aggregated": outcome.aggregated, "valid": outcome.valid,
            "dropped": outcome.dropped, "rejected": outcome.rejected, **metrics,
            "epsilon": eps["epsilon"], "bytes_up": outcome.bytes_up,
            "bytes_down": outcome.bytes_down, "round_time_s": round_times[-1],
            "elapsed_s": now - started}, dp_level=config.dp_level)
        rd.write_json_atomic(paths[rd.PROGRESS], state)
        round_started[0] = time.time()

    _, status, message = strategy.run_rounds(grid, state_to_record(trainable_state(model)),
                                             timeout=options.round_timeout, on_round=on_round)
    if state["failed_rounds"] and status == "completed":
        message = (f"round(s) {state['failed_rounds']} were not aggregated (see "
                   f"{rd.METRICS}); their steps are charged")
    if state["aggregated_rounds"] > 0:
        from safetensors.torch import load_file

        set_trainable_state(model, load_file(paths[rd.CHECKPOINT]))
    test_metrics = evaluate_classifier(model, test, collate, num_labels=num_labels)
    save_sb_adapter(model, paths[rd.FINAL_ADAPTER], sb, base_model=config.model)
    eps = (epsilon_report(paths[rd.LEDGER], delta, config.accountant) if config.private
           else {"epsilon": math.inf, "delta": delta, "per_client_epsilon": {}})
    summary = {
        "status": status, "message": message, "engine": ENGINE,
        "method": config.method,
        "partition": config.partition,
        "test_accuracy": test_metrics["accuracy"], "test_macro_f1": test_metrics["macro_f1"],
        "test_loss": test_metrics["loss"], "test_examples": test_metrics["examples"],
        "rounds_completed": state["completed_rounds"],
        "rounds_aggregated": state["aggregated_rounds"],
        "rounds_failed": state["failed_rounds"], "rounds_planned": config.rounds,
        "noise_multiplier": sigma, "privacy": eps, "target_epsilon": config.epsilon,
        "privacy_unit": config.dp_level, "bytes_setup": state["bytes_setup"],
        "bytes_up": state["bytes_up"], "bytes_down": state["bytes_down"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "clients": sizes, "seed_mode": "seeded" if streams.seeded else "os-entropy",
        "label_names": list(setup.label_names), "round_times_s": round_times,
        "wall_time_s": time.time() - started,
        "trust_model": release.trust_model(config.dp_level, engine=ENGINE),
    }
    summary, operator = release.split_record(summary, dp_level=config.dp_level)
    release.append_operator(out, "summary", operator)
    rd.write_json_atomic(paths[rd.SUMMARY], summary)
    return summary


def make_server_app(config: RunConfig | None = None,
                    options: FlowerOptions | None = None) -> ServerApp:
    """A ServerApp for ``config``, or one that reads the Flower run config (``flwr run``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
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
