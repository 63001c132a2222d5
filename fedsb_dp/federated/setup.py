"""Building a run's parts, once for both drivers: data, partitions, clients, model, adapters.

The in-process driver builds every client here; a Flower SuperNode builds only its own
(:func:`node_client`) from the same seeded partition, and the Flower server builds only the
model and the evaluator's split. Whatever is built, it is built by the same function, so the
two drivers train the same clients on the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedsb_dp.adapters import (
    SBConfig,
    find_target_modules,
    random_orthonormal_init,
    w0_svd_init,
)
from fedsb_dp.adapters.inject import trainable_modules
from fedsb_dp.data import (
    IN_MEMORY_DATASET,
    TextClassificationData,
    cap_records,
    load_text_classification,
)
from fedsb_dp.devices import resolve_device, resolve_dtype, train_in_float32
from fedsb_dp.errors import ConfigError, SettingError
from fedsb_dp.federated.client import DPClient
from fedsb_dp.federated.partition import (
    PartitionSpec,
    client_frames,
    client_id,
    natural_partition,
    partition_records,
    partition_report,
)
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.methods import FederatedMethod, method_class
from fedsb_dp.models import CAUSAL_LM, LoadedModel, load_model
from fedsb_dp.tasks import CausalLMTask, ClassificationTask, Task, label_prompt

CENTRAL = "central"  # the single client of the centralised references


def client_ids(config: RunConfig) -> list[str]:
    """Every client of the run, in stream-index order."""
    if config.method_is_central:
        return [CENTRAL]
    return [client_id(i) for i in range(config.clients)]


def load_data(config: RunConfig, path: str | None = None, *,
              data: Any = None) -> TextClassificationData:
    """The run's dataset (or a node's own file at ``path``) with the configured columns.

    Args:
        config: The run's settings (columns, ``max_train_records``; ``dataset`` unless
            ``path`` or ``data`` is given).
        path: A Flower node's own file.
        data: In-memory data (see :func:`fedsb_dp.data.load_text_classification`); the run's
            ``dataset`` must then be :data:`~fedsb_dp.data.IN_MEMORY_DATASET`.

    Raises:
        ConfigError: If in-memory data and a dataset name are both given, or a run trained
            on in-memory data is asked to read them back from its config.
        fedsb_dp.errors.DataError: For data that cannot be used (see the loader).

    """
    if data is not None and config.dataset != IN_MEMORY_DATASET:
        raise ConfigError(f"dataset={config.dataset!r} and in-memory data were both given; "
                          f"give one (the in-memory run records dataset={IN_MEMORY_DATASET!r})")
    if data is None and path is None and config.dataset == IN_MEMORY_DATASET:
        raise ConfigError("this run trained on in-memory data, which its directory does not "
                          "hold; pass the same data again: fedsb_dp.resume(run_dir, data=...)")
    # A causal-LM run on prompt/response (or single text) columns has no labels; its prompt
    # and response travel as the standard text and text-pair columns.
    columns = {"text_column": config.text_column, "text_pair_column": config.text_pair_column,
               "label_column": config.label_column}
    if config.lm_format == "prompt-response":
        columns = {"text_column": config.prompt_column,
                   "text_pair_column": config.response_column, "label_column": None}
    elif config.lm_format == "text":
        columns = {"text_column": config.response_column, "text_pair_column": None,
                   "label_column": None}
    spec = PartitionSpec.parse(config.partition)
    # A node's own file holds one client's records: no splits or groups to pick from.
    splits = {} if path else {
        "dataset_config": config.dataset_config, "train_split": config.train_split,
        "validation_split": config.validation_split, "test_split": config.test_split}
    return load_text_classification(
        data if data is not None else path or config.dataset, **columns, **splits,
        max_train_records=None if path else config.max_train_records,
        group_column=spec.column if spec.kind == "column" and not path else None,
    )


def make_task(config: RunConfig, data: TextClassificationData) -> Task:
    """The run's task over its data (labels, and for causal LMs the record format)."""
    if config.task == CAUSAL_LM:
        return CausalLMTask(config.lm_format, label_names=tuple(data.label_names),
                            prompt_template=label_prompt(config.dataset))
    return ClassificationTask(tuple(data.label_names))


def load_base_model(config: RunConfig, *, num_labels: int) -> LoadedModel:
    """The pretrained model (a fresh head for a classifier), dropout off unless asked for.

    ``num_labels`` is ignored for causal LMs, whose head is the pretrained LM head. Loaded in
    ``config.dtype`` on ``config.device`` (resolved here, before anything of the run is
    written, so a missing GPU fails first).

    Raises:
        SettingError: If ``config.device`` is not on this machine.

    """
    device = resolve_device(config.device)
    loaded = load_model(config.model, task=config.task, num_labels=max(num_labels, 2),
                        pooling=config.pooling, dtype=resolve_dtype(config.dtype))
    loaded.model.to(device)
    if not config.model_dropout:
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return loaded


def sb_config(config: RunConfig) -> SBConfig:
    """The LoRA-SB adapter settings of a run."""
    return SBConfig(rank=config.rank, target_modules=config.targets,
                    dropout=config.adapter_dropout, train_head=config.trains_head,
                    train_pooler=config.train_pooler)


def make_method(config: RunConfig) -> FederatedMethod:
    """The run's federated method."""
    cls, _ = method_class(config.method)
    scaling = 1.0 if cls.adapter == "lora-sb" else config.lora_scaling
    return cls(rank=config.rank, scaling=scaling, dropout=config.adapter_dropout,
               train_head=config.trains_head, train_pooler=config.train_pooler)


def targets_of(config: RunConfig, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layers to adapt (checks the rank against every one of them)."""
    sb = sb_config(config)
    return find_target_modules(model, sb.resolved_targets(model.config.model_type),
                               rank=config.rank)


def inject(config: RunConfig, method: FederatedMethod, model: torch.nn.Module, *,
           init_seed: int, factors: dict[str, Any] | None = None) -> None:
    """Inject the method's adapters with the agreed public start.

    LoRA baselines draw A from ``init_seed``; Fed-SB takes ``factors`` (a data-dependent
    init, computed by the driver) or derives them data-free: ``w0-svd`` from the pretrained
    weights, ``random-orthonormal`` from ``init_seed``. Every node can repeat the data-free
    cases bit for bit, which is how Flower clients agree on B and A without receiving them.
    """
    targets = targets_of(config, model)
    if method.adapter != "lora-sb":  # LoRA's random A, or no adapter at all (head-only)
        method.inject(model, targets, generator=torch.Generator().manual_seed(init_seed))
        _trained_in_float32(config, model)
        return
    if factors is None:
        if config.init == "w0-svd":
            factors = w0_svd_init(targets, rank=config.rank).factors
        elif config.init == "random-orthonormal":
            factors = random_orthonormal_init(targets, rank=config.rank, seed=init_seed).factors
        else:
            raise ConfigError(f"init={config.init!r} reads client data: the driver must compute "
                              "its factors")
    method.inject(model, targets, generator=torch.Generator().manual_seed(init_seed),
                  factors=factors)
    _trained_in_float32(config, model)


def _trained_in_float32(config: RunConfig, model: torch.nn.Module) -> None:
    """A trained head or pooler of a reduced-precision base trains in float32 (no-op else)."""
    train_in_float32(model, trainable_modules(model, train_head=config.trains_head,
                                              train_pooler=config.train_pooler))


def partition_frames(config: RunConfig, data: TextClassificationData, *,
                     partition_seed: int) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Each client's training records (the seeded split) and the partition diagnostics."""
    labels = data.train["label"].to_numpy()
    spec = PartitionSpec.parse(config.partition)
    values = None
    details: dict[str, Any] = {}
    if config.method_is_central:
        parts = [np.arange(len(data.train))]
    elif spec.kind == "column":
        parts, values = natural_partition(data.train["group"],
                                          min_records=natural_min_records(config))
        if len(parts) != config.clients:
            raise SettingError(
                "clients", config.clients,
                f"differs from the {len(parts)} distinct values of column {spec.column!r} "
                f"(partition='{spec}' makes one client per value); set --clients "
                f"{len(parts)}")
    else:
        # Non-IID splits must leave every client a full expected batch (q ≤ 1).
        parts = partition_records(
            labels, config.partition, num_clients=config.clients, seed=partition_seed,
            min_records=1 if config.partition == "iid" else config.batch_size, details=details)
    frames = client_frames(data.train, parts)
    if config.method_is_central:
        frames = {CENTRAL: frames[client_id(0)]}
    report = dict(zip(frames, partition_report(labels, parts, data.label_names).values(),
                      strict=True))
    if values is not None:
        # Which value each client holds: a user or site identity, so operator-only like the
        # rest of this file (the released ledger names clients by index only).
        for cid, value in zip(frames, values, strict=True):
            report[cid]["value"] = value.item() if hasattr(value, "item") else value
    return frames, {
        "spec": "pooled" if config.method_is_central else config.partition,
        "seed": partition_seed, "clients": report, **details,
        # Exact counts of private labels: operator-side diagnostics of the simulation,
        # never sent by a client (a Flower deployment has no such file).
        "privacy": "not a DP release: exact per-client label counts; do not publish with "
                   "the model"}


def natural_min_records(config: RunConfig) -> int:
    """Fewest records a client of a natural partition may hold.

    A full expected batch (q = b/Nᵢ ≤ 1), and for a DP gradient-SVD init the records its
    Poisson sample expects (q_init = init_examples/Nᵢ ≤ 1).
    """
    needs = config.batch_size
    if config.init == "gradient-svd" and config.init_source == "dp":
        needs = max(needs, config.init_examples)
    return needs


def make_client(cid: str, frame: pd.DataFrame, config: RunConfig, tokenizer: Any,
                task: Task) -> DPClient:
    """A DP-SGD client over its records, tokenised and batched by the run's task."""
    dataset = task.dataset(frame, tokenizer, max_length=config.max_length)
    return DPClient(cid, dataset, task.collate(tokenizer), task=task.name)


def node_client(config: RunConfig, *, partition_id: int, num_partitions: int,
                partition_seed: int, label_names: tuple[str, ...], tokenizer: Any,
                data_path: str | None = None) -> DPClient:
    """The one client a Flower node holds: its own file, or its share of the seeded split.

    Raises:
        ConfigError: If the partition does not fit the federation or the labels differ.

    """
    if num_partitions != config.clients:
        raise ConfigError(f"this node is one of num-partitions={num_partitions}, the run "
                          f"has clients={config.clients}; they must be equal")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} must be in [0, {num_partitions - 1}]")
    data = load_data(config, data_path)
    if tuple(data.label_names) != tuple(label_names):
        raise ConfigError(f"this node's labels {list(data.label_names)} differ from the "
                          f"federation's {list(label_names)}")
    cid = client_id(partition_id)
    if data_path:
        frame = data.train
    else:
        frame = partition_frames(config, data, partition_seed=partition_seed)[0][cid]
    return make_client(cid, frame, config, tokenizer, make_task(config, data))


@dataclass
class Evaluator:
    """The evaluator's held-out splits and the task that scores them.

    The splits are not client data: evaluating on them is not a release.
    """

    validation: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    collate: Any
    task: Task

    @property
    def label_names(self) -> tuple[str, ...]:
        """The task's labels (empty for free-form responses)."""
        return self.task.label_names

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What :meth:`evaluate` reports, besides ``examples``."""
        return self.task.metric_names

    @classmethod
    def build(cls, config: RunConfig, data: TextClassificationData,
              tokenizer: Any) -> Evaluator:
        """Tokenise the validation and test splits (capped by ``max_eval_records``)."""
        task = make_task(config, data)
        validation, test = data.validation, data.test
        validation = cap_records(validation, config.max_eval_records, rule=config.eval_sample)
        test = cap_records(test, config.max_eval_records, rule=config.eval_sample)
        return cls(validation=task.dataset(validation, tokenizer, max_length=config.max_length),
                   test=task.dataset(test, tokenizer, max_length=config.max_length),
                   collate=task.collate(tokenizer), task=task)

    def evaluate(self, model: torch.nn.Module, split: str = "validation") -> dict[str, Any]:
        """The task's metrics (:attr:`metric_names`) and ``examples`` on a split."""
        dataset = self.validation if split == "validation" else self.test
        return self.task.evaluate(model, dataset, self.collate)

