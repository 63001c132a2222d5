"""The in-process driver: every client in this process, one shared model, a loop over rounds.

It builds the parts (:mod:`fedsb_dp.federated.setup`), hands them to the
:class:`~fedsb_dp.federated.protocol.RoundProtocol` and carries each instruction to its
:class:`~fedsb_dp.federated.client.DPClient`. All round logic is in the protocol.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from opacus import GradSampleModule

from fedsb_dp import narration
from fedsb_dp.adapters import gradient_svd_init
from fedsb_dp.data import TextClassificationData
from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.client import DPClient, train_instruction
from fedsb_dp.federated.data_record import check_same_data, data_record
from fedsb_dp.federated.initialisation import (
    PublicInitData,
    init_datasets,
    init_generators,
    load_public_init_data,
    uses_public_data,
)
from fedsb_dp.federated.protocol import ClientReply, NoUpdate, Prepared, RoundProtocol
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.setup import (
    Evaluator,
    inject,
    load_base_model,
    load_data,
    make_client,
    make_method,
    make_task,
    partition_frames,
    targets_of,
)
from fedsb_dp.methods import method_class
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)

ENGINE = "inprocess"


@dataclass
class RunResult:
    """Outcome of a run (also written to ``summary.json``).

    Attributes:
        run_dir: Where everything was written.
        status: ``"completed"``, ``"stopped-budget"``, ``"stopped-nonfinite"`` or
            ``"interrupted"``.
        summary: The summary dictionary (ε recomputed from the saved ledger).
        operator: Operator-only facts of the run (wall time, realised traffic; client-level:
            Nᵢ), also in ``operator.jsonl`` and never in ``summary.json``.

    """

    run_dir: str
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    operator: dict[str, Any] = field(default_factory=dict)


def _prepare(config: RunConfig, data: TextClassificationData, *, partition_seed: int,
             ) -> tuple[Prepared, dict[str, DPClient], dict[str, Any], PublicInitData | None]:
    """Partition, clients and model — everything that can fail before spending."""
    frames, partition = partition_frames(config, data, partition_seed=partition_seed)
    narration.say(f"loading model {config.model} …")
    loaded = load_base_model(config, num_labels=data.num_labels)
    task = make_task(config, data)
    clients = {cid: make_client(cid, frame, config, loaded.tokenizer, task)
               for cid, frame in frames.items()}
    # Read before anything is spent, so a bad --init-data fails first.
    public_init = (load_public_init_data(config, label_names=data.label_names,
                                         tokenizer=loaded.tokenizer)
                   if uses_public_data(config) else None)
    prepared = Prepared(model=loaded.model, tokenizer=loaded.tokenizer,
                        resolved_path=loaded.resolved_path,
                        sizes={cid: c.num_records for cid, c in clients.items()},
                        evaluator=Evaluator.build(config, data, loaded.tokenizer),
                        model_notes=loaded.notes)
    return prepared, clients, partition, public_init


def _initialiser(config: RunConfig, clients: dict[str, DPClient], streams: RandomStreams,
                 init_seed: int, public_init: PublicInitData | None) -> Any:
    """A callable that injects the agreed adapters into the model.

    A gradient-SVD init reads the clients' records; its events are in the saved ledger by the
    time the protocol calls this.
    """
    method = make_method(config)

    def initialise(model: Any) -> None:
        factors = None
        if config.init == "gradient-svd" and method.adapter == "lora-sb":
            factors = _gradient_factors(config, clients, streams, model, public_init)
        inject(config, method, model, init_seed=init_seed, factors=factors)
    return initialise


def _gradient_factors(config: RunConfig, clients: dict[str, DPClient], streams: RandomStreams,
                      model: Any, public_init: PublicInitData | None) -> dict[str, Any]:
    """B, A, R⁰ from gradients: each client's sampled, clipped and noised sum, or public data."""
    first = next(iter(clients.values()))
    sampling, noise = init_generators(streams, list(clients))
    return gradient_svd_init(
        model, targets_of(config, model),
        init_datasets(config, {cid: c.dataset for cid, c in clients.items()}, public_init),
        first.collate, task=config.task, rank=config.rank, source=config.init_source,
        n_init=config.init_examples, lr_eff=config.init_lr,
        max_grad_norm=config.init_clip_norm, noise_multiplier=config.init_noise_multiplier,
        sampling_generators=sampling, noise_generators=noise,
        allow_nonprivate=config.allow_nonprivate_init,
    ).factors


def _check_peft_export(config: RunConfig, export_peft: bool) -> None:
    """Refuse --export-peft for a method a PEFT adapter cannot express, before any work."""
    if export_peft and method_class(config.method)[0].folds_base:
        raise ConfigError(f"--export-peft cannot express method={config.method!r}: its updates "
                          "are folded into the base weights; use --export-merged")


def _start(config: RunConfig, *, in_memory: Any = None,
           ) -> tuple[RoundProtocol, dict[str, DPClient]]:
    out = config.out or rd.default_run_dir()
    config = RunConfig.from_dict({**config.to_dict(), "out": out})
    rd.check_new_run_dir(out)  # fail fast, before loading anything
    narration.say(f"loading data {config.dataset} …")
    data = load_data(config, data=in_memory)
    streams = RandomStreams(config.seed)
    partition_seed = streams.integer("partition")
    prepared, clients, partition, public_init = _prepare(config, data,
                                                         partition_seed=partition_seed)
    init_seed = streams.integer("init-factors")
    protocol = RoundProtocol.create(
        config, prepared, engine=ENGINE, partition_seed=partition_seed, init_seed=init_seed,
        partition=partition, data_record=data_record(data, config.dataset_config),
        public_init=public_init,
        initialise=_initialiser(config, clients, streams, init_seed, public_init))
    return protocol, clients


def run_federation(
    config: RunConfig,
    *,
    resume: bool = False,
    export_merged: bool = False,
    export_peft: bool = False,
    progress: bool = True,
    stop_after_rounds: int | None = None,
    data: Any = None,
) -> RunResult:
    """Run (or resume) a private federated fine-tuning with any method (Fed-SB by default).

    Args:
        config: The settings (for ``resume``, ``config.out`` names the run to continue and
            the saved settings are used).
        resume: Continue the run in ``config.out`` from its last completed round.
        export_merged: Also save a merged ``transformers`` model in ``merged/`` (as
            ``fedsb-dp export --format merged``).
        export_peft: Also save a PEFT LoRA adapter in ``peft_adapter/`` (as ``fedsb-dp
            export --format peft``; refused for FedEx-LoRA and FLoRA).
        progress: Show progress bars.
        stop_after_rounds: Stop (as if killed) after this many rounds in this call; for tests.
        data: In-memory data (a pandas DataFrame, ``datasets.Dataset``/``DatasetDict``) for
            a run whose ``config.dataset`` is ``"<in-memory>"``; on resume, the same data
            again (refused if its digest differs from the one recorded in ``data.json``).

    Returns:
        Where the run is, how it ended, and its summary.

    """
    from tqdm.auto import tqdm

    if resume:
        saved, state = RoundProtocol.saved(config.out)
        _check_peft_export(saved, export_peft)
        narration.say(f"resuming {config.out} after round {state['completed_rounds']}; "
                      f"loading data {saved.dataset} …")
        loaded = load_data(saved, data=data)
        check_same_data(config.out, loaded)  # before the model is loaded or a step is run
        prepared, clients, _, _ = _prepare(saved, loaded, partition_seed=state["partition_seed"])
        protocol = RoundProtocol.resume(config.out, prepared)
    else:
        _check_peft_export(config, export_peft)
        protocol, clients = _start(config, in_memory=data)
    config = protocol.config
    private_model = GradSampleModule(protocol.model, batch_first=True, loss_reduction="mean")
    rounds_this_call = 0
    try:
        while not protocol.done:
            if stop_after_rounds is not None and rounds_this_call >= stop_after_rounds:
                protocol.stop("interrupted", "stopped by the caller")
                return RunResult(run_dir=config.out, status="interrupted")
            ticket = protocol.configure_round()
            if ticket is None:
                break
            replies: dict[str, ClientReply] = {}
            for cid, instruction in ticket.instructions.items():
                with tqdm(total=config.local_steps, disable=not progress, leave=False,
                          desc=f"round {ticket.round_index + 1}/{config.rounds} {cid}") as bar:
                    try:
                        replies[cid] = train_instruction(
                            clients[cid], private_model, instruction, protocol.streams,
                            on_step=lambda _step, bar=bar: bar.update(1))
                    except FedSBError as exc:
                        replies[cid] = NoUpdate(f"client failed: {exc}")
            protocol.aggregate_round(ticket, replies)
            rounds_this_call += 1
    finally:
        private_model._close()
    summary = protocol.finish()
    from fedsb_dp.use.export import export_into_run_dir

    export_into_run_dir(config.out, merged=export_merged, peft=export_peft)
    return RunResult(run_dir=config.out, status=summary["status"], summary=summary,
                     operator=protocol.operator)
