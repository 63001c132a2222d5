"""The in-process Fed-SB engine: setup, private rounds, budget guard, checkpoints, resume.

Order of operations (each release is in the ledger before its noise exists):

1. Validate settings, load data and partition it, check δ < 1/N_total, load the model and
   check the rank against every target — all before any private record is touched.
2. Calibrate σ once for the whole plan (init event + every round × local steps × per-client q)
   so the max-over-clients ε meets the target; an unreachable target stops here.
3. Initialise B, A, R⁰ (data-free by default); a data-dependent init is reserved in the ledger
   first. The agreed factors are saved so a resume never re-runs the init.
4. Per round: the budget guard projects ε with this round's steps and refuses if it would pass
   the target; otherwise it reserves them in the ledger (saved to disk) *before* any client
   trains. Clients train with Opacus DP-SGD; replies are validated (fingerprint, keys, shapes,
   steps); R̄ is their mean; the reservation is committed and a checkpoint written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from safetensors.torch import load_file, save_file

from accounting import (
    BudgetExceededError,
    BudgetGuard,
    FederatedPlan,
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_delta,
    default_delta,
    federation_epsilon,
)
from accounting.events import GaussianDpEvent, NonPrivateDpEvent, PoissonSampledDpEvent
from fedsb_dp.adapters import (
    SBConfig,
    find_target_modules,
    frozen_fingerprint,
    gradient_svd_init,
    inject_adapters,
    load_sb_adapter,
    random_orthonormal_init,
    save_sb_adapter,
    trainable_state,
    w0_svd_init,
)
from fedsb_dp.adapters.export import export_peft_adapter, save_merged, set_trainable_state
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated import release
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.client import (
    DPClient,
    LocalTrainingConfig,
    NonFiniteUpdateError,
    sampling_probability,
)
from fedsb_dp.federated.client_level import clipped_noisy_mean, poisson_cohort
from fedsb_dp.federated.evaluation import evaluate_classifier
from fedsb_dp.federated.partition import client_frames, partition_records, partition_report
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.server import payload_bytes, validate_update
from fedsb_dp.methods import FederatedMethod, method_class, set_active_rank, truncate_state
from fedsb_dp.methods.state import (
    BASE_SUFFIX,
    adapted_base_weights,
    load_tensors,
    lora_adapter_tensors,
)
from fedsb_dp.models import load_model, pooling_of
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)

TASK = "sequence-classification"
FEDERATION = "federation"  # the single ledger key of client-level accounting
CENTRAL = "central"  # the single client of the centralised references
LORA_ADAPTER = "lora_adapter.safetensors"
PARTITION = "partition.json"


@dataclass
class RunResult:
    """Outcome of :func:`run_federation` (also written to ``summary.json``).

    Attributes:
        run_dir: Where everything was written.
        status: ``"completed"``, ``"stopped-budget"`` or ``"stopped-nonfinite"``.
        summary: The summary dictionary (ε recomputed from the saved ledger).
        operator: Operator-only facts of the run (wall time, realised traffic; client-level:
            Nᵢ), also in ``operator.jsonl`` and never in ``summary.json``.

    """

    run_dir: str
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    operator: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Setup:
    config: RunConfig
    streams: RandomStreams
    clients: dict[str, DPClient]
    validation: TokenizedDataset
    test: TokenizedDataset
    collate: Callable
    loaded: Any
    delta: float
    n_total: int
    num_labels: int
    label_names: tuple[str, ...]
    partition: dict[str, Any]


def _prepare(config: RunConfig, *, partition_seed: int) -> _Setup:
    """Load data, partition, model; validate everything that can fail before spending."""
    streams = RandomStreams(config.seed)
    data = load_text_classification(
        config.dataset, text_column=config.text_column,
        text_pair_column=config.text_pair_column, label_column=config.label_column,
        max_train_records=config.max_train_records,
    )
    labels = data.train["label"].to_numpy()
    if config.method_is_central:
        parts = [np.arange(len(data.train))]
    else:
        # Non-IID splits must leave every client a full expected batch (q ≤ 1).
        parts = partition_records(
            labels, config.partition, num_clients=config.clients, seed=partition_seed,
            min_records=1 if config.partition == "iid" else config.batch_size)
    frames = client_frames(data.train, parts)
    if config.method_is_central:
        frames = {CENTRAL: frames["client-0"]}
    report = dict(zip(frames, partition_report(labels, parts, data.label_names).values(),
                      strict=True))
    n_total = len(data.train)
    # δ is judged against the number of protected units: records, or clients.
    units = n_total if config.dp_level == "example" else len(frames)
    delta = config.delta if config.delta is not None else default_delta(units)
    if config.private:
        check_delta(delta, n_total=units, allow_large=config.allow_large_delta)
    for frame in frames.values():
        sampling_probability(config.batch_size, len(frame))  # raises with a clear message
    loaded = load_model(config.model, task=TASK, num_labels=data.num_labels,
                        pooling=config.pooling)
    if not config.model_dropout:
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    collate = make_collate(loaded.tokenizer)
    clients = {
        cid: DPClient(cid, TokenizedDataset(frame, loaded.tokenizer,
                                            max_length=config.max_length), collate, task=TASK)
        for cid, frame in frames.items()
    }
    validation, test = data.validation, data.test
    if config.max_eval_records is not None:
        validation = validation.head(config.max_eval_records)
        test = test.head(config.max_eval_records)
    return _Setup(
        config=config, streams=streams, clients=clients,
        validation=TokenizedDataset(validation, loaded.tokenizer, max_length=config.max_length),
        test=TokenizedDataset(test, loaded.tokenizer, max_length=config.max_length),
        collate=collate, loaded=loaded, delta=delta, n_total=n_total,
        num_labels=data.num_labels, label_names=data.label_names,
        partition={"spec": "pooled" if config.method_is_central else config.partition,
                   "seed": partition_seed, "clients": report,
                   # Exact counts of private labels: operator-side diagnostics of the
                   # simulation, never sent by a client (the Flower path has no such file).
                   "privacy": "not a DP release: exact per-client label counts; do not "
                              "publish with the model"},
    )


def _sb_config(config: RunConfig) -> SBConfig:
    return SBConfig(rank=config.rank, target_modules=config.targets,
                    dropout=config.adapter_dropout, train_head=config.train_head,
                    train_pooler=config.train_pooler)


def _method(config: RunConfig) -> FederatedMethod:
    cls, _ = method_class(config.method)
    scaling = 1.0 if cls.adapter == "lora-sb" else config.lora_scaling
    return cls(rank=config.rank, scaling=scaling, dropout=config.adapter_dropout,
               train_head=config.train_head, train_pooler=config.train_pooler)


def _init_events(config: RunConfig, client_ids: list[str]) -> dict[str, Any]:
    """The init release each client is charged for (empty when the init reads no record)."""
    if method_class(config.method)[0].adapter != "lora-sb":
        return {}  # LoRA baselines start from data-free random A and B = 0
    if config.init != "gradient-svd" or config.init_source == "public":
        return {}
    if config.init_source == "nonprivate" or config.init_noise_multiplier == 0:
        return {cid: NonPrivateDpEvent() for cid in client_ids}
    return {cid: GaussianDpEvent(noise_multiplier=config.init_noise_multiplier)
            for cid in client_ids}


def round_participants(config: RunConfig, streams: RandomStreams, round_index: int,
                       client_ids: list[str]) -> list[str]:
    """The clients of a round: all, or a seeded sample (shared with the Flower strategy)."""
    if config.participation >= 1.0:
        return list(client_ids)
    count = max(config.min_clients, round(config.participation * len(client_ids)))
    chosen = streams.numpy("participation", round_index).choice(
        len(client_ids), size=count, replace=False)
    return [client_ids[i] for i in sorted(chosen)]


def _round_event(config: RunConfig, noise_multiplier: float) -> Any:
    """Client-level: one round over the client population (Poisson cohort of rate p)."""
    gaussian = GaussianDpEvent(noise_multiplier=noise_multiplier)
    if config.participation >= 1:
        return gaussian
    return PoissonSampledDpEvent(sampling_probability=config.participation, event=gaussian)


def _plan(config: RunConfig, setup: _Setup) -> FederatedPlan:
    if config.dp_level == "client":
        return FederatedPlan(sampling_probabilities={FEDERATION: config.participation},
                             local_steps=1, rounds=config.rounds)
    return FederatedPlan(
        sampling_probabilities={
            cid: sampling_probability(config.batch_size, c.num_records)
            for cid, c in setup.clients.items()
        },
        local_steps=config.local_steps,
        rounds=config.rounds,
        init_events=_init_events(config, list(setup.clients)),
    )


def _initialise(setup: _Setup, sb: SBConfig, method: FederatedMethod, ledger: PrivacyLedger,
                ledger_path: str) -> None:
    """Compute the agreed factors and inject them; a data-dependent init is ledgered first."""
    config = setup.config
    model = setup.loaded.model
    targets = find_target_modules(model, sb.resolved_targets(model.config.model_type),
                                  rank=config.rank)
    if method.adapter == "lora":
        method.inject(model, targets, generator=setup.streams.torch("lora-init"))
        return
    if config.init == "w0-svd":
        result = w0_svd_init(targets, rank=config.rank)
    elif config.init == "random-orthonormal":
        result = random_orthonormal_init(targets, rank=config.rank,
                                         seed=setup.streams.integer("init-factors"))
    else:
        for cid, event in _init_events(config, list(setup.clients)).items():
            ledger.record(cid, event, count=1, kind="init")
        ledger.save(ledger_path)
        result = gradient_svd_init(
            model, targets, {cid: c.dataset for cid, c in setup.clients.items()},
            setup.collate, task=TASK, rank=config.rank, source=config.init_source,
            n_init=min(config.init_examples, min(c.num_records for c in setup.clients.values())),
            lr_eff=config.init_lr, max_grad_norm=config.init_clip_norm,
            noise_multiplier=config.init_noise_multiplier,
            generator=setup.streams.torch("init-noise") if setup.streams.seeded else None,
            allow_nonprivate=config.allow_nonprivate_init,
        )
    inject_adapters(model, result.factors, sb)


def _local_config(config: RunConfig, sigma: float) -> LocalTrainingConfig:
    return LocalTrainingConfig(
        expected_batch_size=config.batch_size, local_steps=config.local_steps,
        learning_rate=config.learning_rate, optimizer=config.optimizer,
        max_grad_norm=config.max_grad_norm, noise_multiplier=sigma,
        max_physical_batch_size=config.max_physical_batch_size,
    )


def epsilon_report(ledger_path: str, delta: float, accountant: str) -> dict[str, Any]:
    """ε recomputed from the ledger file on disk — never a number carried in memory.

    Shared by the in-process engine and the Flower ServerApp, so both report the same keys.
    """
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


def _checkpoint(model: torch.nn.Module, method: FederatedMethod) -> dict[str, torch.Tensor]:
    """The global state after a round: trainable tensors, plus folded base weights if any."""
    tensors = {k: v.contiguous() for k, v in trainable_state(model).items()}
    if method.name in ("fedex-lora", "flora"):
        tensors.update(adapted_base_weights(model))
    return tensors


def _restore(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    base = {k: v for k, v in tensors.items() if k.endswith(BASE_SUFFIX)}
    load_tensors(model, base)
    set_trainable_state(model, {k: v for k, v in tensors.items() if k not in base})


def _save_adapter(model: torch.nn.Module, method: FederatedMethod, directory: str,
                  sb: SBConfig, base_model: str) -> None:
    if method.adapter == "lora-sb":
        save_sb_adapter(model, directory, sb, base_model=base_model)
        return
    os.makedirs(directory, exist_ok=True)
    tensors = lora_adapter_tensors(model)
    if method.name in ("fedex-lora", "flora"):
        tensors.update(adapted_base_weights(model))
    save_file(tensors, os.path.join(directory, LORA_ADAPTER) + ".tmp",
              metadata={"method": method.name, "base_model": base_model,
                        "frozen_fingerprint": frozen_fingerprint(model)})
    os.replace(os.path.join(directory, LORA_ADAPTER) + ".tmp",
               os.path.join(directory, LORA_ADAPTER))


def _load_adapter(setup: _Setup, method: FederatedMethod, sb: SBConfig,
                  directory: str) -> SBConfig:
    model = setup.loaded.model
    if method.adapter == "lora-sb":
        return load_sb_adapter(model, directory)
    targets = find_target_modules(model, sb.resolved_targets(model.config.model_type),
                                  rank=sb.rank)
    method.inject(model, targets, generator=torch.Generator().manual_seed(0))
    # Every saved tensor, frozen ones included (FFA-LoRA's A, a frozen pooler).
    load_tensors(model, load_file(os.path.join(directory, LORA_ADAPTER)))
    return sb


def _client_rank(config: RunConfig, client_ids: list[str], cid: str) -> int | None:
    if config.client_ranks is None:
        return None
    return config.client_ranks[client_ids.index(cid)]


def _sent(tensors: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """What actually travels to or from a client of the given rank."""
    return tensors if rank is None else truncate_state(tensors, rank)


def run_federation(
    config: RunConfig,
    *,
    resume: bool = False,
    export_merged: bool = False,
    export_peft: bool = False,
    progress: bool = True,
    stop_after_rounds: int | None = None,
) -> RunResult:
    """Run (or resume) a private federated fine-tuning with any method (Fed-SB by default).

    Args:
        config: The settings (for ``resume``, ``config.out`` names the run to continue and
            the saved settings are used).
        resume: Continue the run in ``config.out`` from its last completed round.
        export_merged: Also save a merged ``transformers`` model (Fed-SB only).
        export_peft: Also save a PEFT LoRA adapter (Fed-SB only).
        progress: Show progress bars.
        stop_after_rounds: Stop (as if killed) after this many rounds in this call; for tests.

    Returns:
        Where the run is, how it ended, and its summary.

    """
    from tqdm.auto import tqdm

    started = time.time()
    out = config.out or rd.default_run_dir()
    if (export_merged or export_peft) and config.method not in ("fedsb", "central-sb"):
        raise ConfigError(f"--export-merged/--export-peft are implemented for Fed-SB runs, not "
                          f"method={config.method!r}")
    paths = {name: os.path.join(out, name) for name in (
        rd.CONFIG, rd.LEDGER, rd.METRICS, rd.PROGRESS, rd.PROVENANCE, rd.INIT_ADAPTER,
        rd.CHECKPOINT, rd.FINAL_ADAPTER, rd.SUMMARY, PARTITION)}
    if resume:
        if not os.path.exists(paths[rd.PROGRESS]):
            raise ConfigError(f"{out!r} is not a resumable run directory (no {rd.PROGRESS})")
        config = RunConfig.from_dict(rd.read_json(paths[rd.CONFIG])["config"])
        config = RunConfig.from_dict({**config.to_dict(), "out": out})
        state = rd.read_json(paths[rd.PROGRESS])
        setup = _prepare(config, partition_seed=state["partition_seed"])
        method = _method(config)
        sb = _load_adapter(setup, method, _sb_config(config), paths[rd.INIT_ADAPTER])
        if state["completed_rounds"] > 0:
            _restore(setup.loaded.model, load_file(paths[rd.CHECKPOINT]))
        if frozen_fingerprint(setup.loaded.model) != state["fingerprint"]:
            raise FedSBError(f"{out}: saved adapter does not match its recorded fingerprint")
        ledger = PrivacyLedger.load(paths[rd.LEDGER])
        sigma = state["noise_multiplier"]
    else:
        rd.check_new_run_dir(out)  # fail fast, before loading anything
        streams = RandomStreams(config.seed)
        partition_seed = streams.integer("partition")
        setup = _prepare(config, partition_seed=partition_seed)
        model = setup.loaded.model
        sb = _sb_config(config)
        method = _method(config)
        if (export_merged or export_peft) and pooling_of(model) == "mean":
            raise ConfigError("--export-merged/--export-peft cannot express the mean pooler "
                              "this model's classifier reads; add --pooling cls, or keep the "
                              "saved adapter")
        # Rank against every target before any privacy work.
        find_target_modules(model, sb.resolved_targets(model.config.model_type), rank=config.rank)
        if config.private:
            calibration = calibrate_noise_multiplier(
                target_epsilon=config.epsilon, target_delta=setup.delta,
                plan=_plan(config, setup), accountant=config.accountant,
            )
            sigma = calibration.noise_multiplier
        else:
            sigma = 0.0
        rd.claim_new_run_dir(out)
        rd.write_json_atomic(paths[rd.CONFIG], {"config": config.to_dict(),
                                                 "digest": config.digest()})
        rd.write_json_atomic(paths[rd.PROVENANCE],
                             rd.provenance(config.digest(), seeded=setup.streams.seeded))
        rd.write_json_atomic(paths[PARTITION], setup.partition)
        client_level = config.dp_level == "client"
        ledger = PrivacyLedger(
            unit=config.dp_level,
            dataset_sizes=({FEDERATION: config.clients} if client_level else
                           {cid: c.num_records for cid, c in setup.clients.items()}),
            target_epsilon=config.epsilon, target_delta=setup.delta,
            allow_large_delta=config.allow_large_delta,
            metadata={"seed_mode": "seeded" if setup.streams.seeded else "os-entropy",
                      "noise_is_release": not setup.streams.seeded,
                      "sampling": "poisson", "noise_multiplier": sigma,
                      "max_grad_norm": config.max_grad_norm, "method": config.method,
                      "dp_level": config.dp_level,
                      **({"client_clip_norm": config.client_clip_norm} if client_level else {})},
        )
        ledger.save(paths[rd.LEDGER])
        _initialise(setup, sb, method, ledger, paths[rd.LEDGER])
        _save_adapter(model, method, paths[rd.INIT_ADAPTER], sb, config.model)
        client_ids = list(setup.clients)
        initial = trainable_state(model)
        setup_bytes = {cid: payload_bytes(method.setup_payload(model)) for cid in client_ids}
        state = {"completed_rounds": 0, "partition_seed": partition_seed,
                 "noise_multiplier": sigma,
                 "fingerprint": frozen_fingerprint(model),
                 "bytes_setup": sum(setup_bytes.values()),
                 "bytes_setup_by_client": setup_bytes,
                 # What the server sends each client at the start of the next round.
                 "next_down_by_client": {
                     cid: payload_bytes(_sent(initial, _client_rank(config, client_ids, cid)))
                     for cid in client_ids},
                 "bytes_up": 0, "bytes_down": 0}
        rd.write_json_atomic(paths[rd.PROGRESS], state)

    model = setup.loaded.model
    client_ids = list(setup.clients)
    client_level = config.dp_level == "client"
    # Client-level: clients train without local noise; the server clips and noises.
    local = _local_config(config, 0.0 if client_level else sigma)
    guard = BudgetGuard(ledger, target_epsilon=config.epsilon if config.private else math.inf,
                        delta=setup.delta, accountant=config.accountant)
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    status = "completed"
    message = None
    rounds_this_call = 0
    try:
        for round_index in range(state["completed_rounds"], config.rounds):
            if stop_after_rounds is not None and rounds_this_call >= stop_after_rounds:
                status = "interrupted"
                break
            if client_level:
                participants = poisson_cohort(client_ids, config.participation,
                                              setup.streams.torch("cohort", round_index))
                step_events = {FEDERATION: (_round_event(config, sigma)
                                            if config.private else NonPrivateDpEvent(), 1)}
            else:
                participants = round_participants(config, setup.streams, round_index, client_ids)
                step_events = {
                    cid: (local.step_event(setup.clients[cid].num_records)
                          if config.private else NonPrivateDpEvent(), config.local_steps)
                    for cid in participants
                }
            try:
                token = guard.reserve_round(step_events, round_index=round_index)
            except BudgetExceededError as exc:
                status, message = "stopped-budget", str(exc)
                logger.warning("stopping before round %d: %s", round_index + 1, exc)
                break
            ledger.save(paths[rd.LEDGER])
            global_state = trainable_state(model)
            updates, sent_states = [], []
            up_by_client: dict[str, int] = {}
            for cid in participants:
                rank = _client_rank(config, client_ids, cid)
                bar = tqdm(total=config.local_steps, disable=not progress, leave=False,
                           desc=f"round {round_index + 1}/{config.rounds} {cid}")
                set_active_rank(model, rank)
                try:
                    update = setup.clients[cid].train_round(
                        private_model, global_state, local,
                        noise_generator=setup.streams.torch("noise", round_index,
                                                            client_ids.index(cid)),
                        sampling_generator=setup.streams.torch("poisson", round_index,
                                                               client_ids.index(cid)),
                        dropout_seed=setup.streams.integer("dropout", round_index,
                                                           client_ids.index(cid)),
                        on_step=lambda _step, bar=bar: bar.update(1),
                    )
                finally:
                    set_active_rank(model, None)
                bar.close()
                validate_update(update, global_state=global_state,
                                fingerprint=state["fingerprint"],
                                expected_steps=config.local_steps,
                                finite_required=not client_level)
                updates.append(update)
                sent_states.append(_sent(update.state, rank))
                up_by_client[cid] = payload_bytes(sent_states[-1])
            if client_level:
                aggregated = clipped_noisy_mean(
                    global_state, [u.state for u in updates],
                    clip_norm=config.client_clip_norm, noise_multiplier=sigma,
                    denominator=config.participation * len(client_ids),
                    generator=setup.streams.torch("server-noise", round_index))
                set_trainable_state(model, aggregated)
                downlink = aggregated
            else:
                result = method.aggregate(
                    model, global_state, sent_states,
                    generator=setup.streams.torch("adapter-restart", round_index))
                method.apply(model, result)
                downlink = result.downlink
            state["fingerprint"] = frozen_fingerprint(model)
            guard.commit(token)
            ledger.save(paths[rd.LEDGER])
            save_file(_checkpoint(model, method), paths[rd.CHECKPOINT] + ".tmp")
            os.replace(paths[rd.CHECKPOINT] + ".tmp", paths[rd.CHECKPOINT])
            down_by_client = {cid: state["next_down_by_client"][cid] for cid in participants}
            up, down = sum(up_by_client.values()), sum(down_by_client.values())
            state.update(completed_rounds=round_index + 1,
                         bytes_up=state["bytes_up"] + up, bytes_down=state["bytes_down"] + down,
                         next_down_by_client={
                             cid: payload_bytes(_sent(downlink,
                                                      _client_rank(config, client_ids, cid)))
                             for cid in client_ids})
            metrics = evaluate_classifier(model, setup.validation, setup.collate,
                                          num_labels=setup.num_labels)
            eps = (epsilon_report(paths[rd.LEDGER], setup.delta, config.accountant)
                   if config.private else {"epsilon": math.inf})
            release.write_round(out, {
                "round": round_index + 1, "participants": participants,
                "validation_accuracy": metrics["accuracy"], "validation_loss": metrics["loss"],
                "validation_macro_f1": metrics["macro_f1"], "epsilon": eps["epsilon"],
                "bytes_up": up, "bytes_down": down, "bytes_up_by_client": up_by_client,
                "bytes_down_by_client": down_by_client, "elapsed_s": time.time() - started,
            }, dp_level=config.dp_level)
            rd.write_json_atomic(paths[rd.PROGRESS], state)
            rounds_this_call += 1
            logger.info("round %d: validation accuracy %.4f, ε so far %.4g",
                        round_index + 1, metrics["accuracy"], eps["epsilon"])
    except NonFiniteUpdateError as exc:
        # The released reason names no client or step; the details are the operator's.
        status, message = "stopped-nonfinite", release.NONFINITE_STOP_MESSAGE
        release.append_operator(out, "stop", {"status": status, "detail": str(exc),
                                              "round": state["completed_rounds"] + 1})
        logger.error("%s; %s", message, exc)
    finally:
        private_model._close()
    if status == "interrupted":
        return RunResult(run_dir=out, status=status)
    if state["completed_rounds"] > 0:
        _restore(model, load_file(paths[rd.CHECKPOINT]))
    test_metrics = evaluate_classifier(model, setup.test, setup.collate,
                                       num_labels=setup.num_labels)
    _save_adapter(model, method, paths[rd.FINAL_ADAPTER], sb, config.model)
    if export_merged:
        save_merged(model, os.path.join(out, "merged"), setup.loaded.tokenizer)
    if export_peft:
        export_peft_adapter(model, os.path.join(out, "peft_adapter"),
                            base_model=setup.loaded.resolved_path)
    eps = (epsilon_report(paths[rd.LEDGER], setup.delta, config.accountant)
           if config.private else {"epsilon": math.inf, "delta": setup.delta,
                                   "per_client_epsilon": {}})
    summary = {
        "status": status, "message": message, "method": config.method,
        "partition": setup.partition["spec"],
        "test_accuracy": test_metrics["accuracy"], "test_macro_f1": test_metrics["macro_f1"],
        "test_loss": test_metrics["loss"], "test_examples": test_metrics["examples"],
        "rounds_completed": state["completed_rounds"], "rounds_planned": config.rounds,
        "noise_multiplier": sigma, "privacy": eps, "target_epsilon": config.epsilon,
        "privacy_unit": config.dp_level,
        "bytes_setup": state["bytes_setup"], "bytes_up": state["bytes_up"],
        "bytes_down": state["bytes_down"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "clients": {cid: c.num_records for cid, c in setup.clients.items()},
        "seed_mode": "seeded" if setup.streams.seeded else "os-entropy",
        "label_names": list(setup.label_names), "wall_time_s": time.time() - started,
        "trust_model": release.trust_model(config.dp_level, engine="inprocess"),
    }
    summary, operator = release.split_record(summary, dp_level=config.dp_level)
    if client_level:
        summary.update(bytes_basis="expected", **{
            f"bytes_{way}": release.expected_traffic(
                state["next_down_by_client"], participation=config.participation,
                rounds=state["completed_rounds"]) for way in ("up", "down")})
    release.append_operator(out, "summary", operator)
    rd.write_json_atomic(paths[rd.SUMMARY], summary)
    return RunResult(run_dir=out, status=status, summary=summary, operator=operator)
