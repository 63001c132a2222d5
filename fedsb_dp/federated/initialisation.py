"""What a run's initialisation reads and releases: per-client init events, the public init data.

The engine asks this module three things before any private record is touched:

* :func:`init_events` — the release each client is charged for (used by calibration and
  written to the ledger before the init runs). For ``gradient-svd`` with source ``dp`` it is
  ``PoissonSampledDpEvent(n_init / N_i, GaussianDpEvent(σ_init))``, from the client's own size
  only.
* :func:`load_public_init_data` — the records of ``--init-data`` for source ``public``, with a
  reference (source, columns, digests) that the run directory keeps. The clients' own records
  are never a public source.
* :func:`init_record` — the JSON description of the init kept in the ledger's metadata, which
  ``fedsb-dp audit`` compares with the ledger's init events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from accounting.events import NonPrivateDpEvent
from fedsb_dp.adapters.initializers import dp_init_event
from fedsb_dp.data import (
    DEFAULT_DATASET,
    TokenizedDataset,
    load_text_classification,
    rotten_tomatoes_path,
)
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods import method_class
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)

PUBLIC_KEY = "public-init-data"  # data-holder key of the public dataset in the init


@dataclass(frozen=True)
class PublicInitData:
    """The public records a ``public``-source init computes its gradients on.

    Attributes:
        dataset: The records, tokenised like the training data.
        reference: JSON-safe description kept in the run directory: ``source``, the columns,
            ``records`` used, ``records_sha256`` (of the records used) and ``file_sha256``
            (for a local or packaged file; ``None`` for a hub dataset).
    """

    dataset: TokenizedDataset
    reference: dict[str, Any]


def reads_client_records(config: Any) -> bool:
    """Whether the run's init is computed from the clients' records (``dp``/``nonprivate``)."""
    return (method_class(config.method)[0].adapter == "lora-sb"
            and config.init == "gradient-svd" and config.init_source != "public")


def uses_public_data(config: Any) -> bool:
    """Whether the run's init is computed from ``--init-data``."""
    return (method_class(config.method)[0].adapter == "lora-sb"
            and config.init == "gradient-svd" and config.init_source == "public")


def init_events(config: Any, client_sizes: Mapping[str, int]) -> dict[str, Any]:
    """The init release each client is charged for (empty when the init reads no record).

    Args:
        config: The run's ``RunConfig``.
        client_sizes: Client id → N_i.

    Raises:
        ConfigError: If ``init_examples`` exceeds a client's N_i (q_init > 1), naming both.
    """
    if not reads_client_records(config):
        return {}  # data-free, public data, or LoRA baselines (random A, B = 0)
    if config.init_source == "nonprivate" or config.init_noise_multiplier == 0:
        return {cid: NonPrivateDpEvent() for cid in client_sizes}
    return {cid: dp_init_event(config.init_examples, size,
                               noise_multiplier=config.init_noise_multiplier, client_id=cid)
            for cid, size in client_sizes.items()}


def init_datasets(config: Any, client_datasets: Mapping[str, Any],
                  public: PublicInitData | None) -> dict[str, Any]:
    """The data holders a gradient-SVD init reads: the public data, or the clients' records.

    Raises:
        ConfigError: If the source is ``public`` but no public data was loaded (the clients'
            records are never substituted for it).
    """
    if config.init_source == "public":
        if public is None:
            raise ConfigError("init_source='public' needs --init-data PATH|HUB_ID; the "
                              "clients' records are never used as public data")
        return {PUBLIC_KEY: public.dataset}
    return dict(client_datasets)


def init_generators(
    streams: RandomStreams, client_ids: list[str],
) -> tuple[dict[str, torch.Generator] | None, dict[str, torch.Generator] | None]:
    """Per-client (inclusion, noise) generators of the init: seeded streams or OS entropy."""
    if not streams.seeded:
        return None, None  # the initialiser draws fresh OS entropy for each release
    return ({cid: streams.torch("init-poisson", i) for i, cid in enumerate(client_ids)},
            {cid: streams.torch("init-noise", i) for i, cid in enumerate(client_ids)})


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_file(source: str) -> str | None:
    """The file behind a dataset source, or ``None`` for a hub dataset."""
    if source == DEFAULT_DATASET:
        return rotten_tomatoes_path()
    return os.path.abspath(source) if os.path.isfile(source) else None


def _check_not_training_data(init_data: str, dataset: str) -> None:
    if init_data == dataset:
        raise ConfigError(
            f"init_data={init_data!r} is the training dataset itself; a public init must come "
            "from data that is not the clients' records (use --init-source dp to learn the "
            "init from them with DP, or a data-free --init)")
    init_file, train_file = _source_file(init_data), _source_file(dataset)
    if init_file is not None and train_file is not None and (
            init_file == train_file or _file_sha256(init_file) == _file_sha256(train_file)):
        raise ConfigError(
            f"init_data={init_data!r} has the same content as the training dataset "
            f"{dataset!r}; a public init must not read the clients' records")


def _records_sha256(frame: pd.DataFrame) -> str:
    columns = [c for c in ("text", "text_pair", "label") if c in frame.columns]
    rows = frame[columns].astype(str).to_numpy().tolist()
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def load_public_init_data(config: Any, *, label_names: tuple[str, ...], tokenizer: Any,
                          ) -> PublicInitData:
    """Load ``config.init_data`` for a public-source gradient-SVD init.

    Every split of the source is used (it is public), labels are mapped onto the task's
    label names, and the first ``init_examples`` records are kept.

    Args:
        config: The run's ``RunConfig`` (``init_data`` and its column settings).
        label_names: The task's labels; the public labels must be among them.
        tokenizer: The model's tokenizer.

    Raises:
        ConfigError: If ``init_data`` is unset, is the training data, or has labels the task
            does not know.
        DataError: If the source cannot be read or lacks the named columns.
    """
    source = config.init_data
    if not source:
        raise ConfigError("init_source='public' needs --init-data PATH|HUB_ID (public records)")
    _check_not_training_data(source, config.dataset)
    data = load_text_classification(
        source, text_column=config.init_text_column,
        text_pair_column=config.init_text_pair_column, label_column=config.init_label_column)
    frame = pd.concat([data.train, data.validation, data.test], ignore_index=True)
    names = frame["label"].map(lambda i: data.label_names[i])
    task_ids = {name: index for index, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(task_ids))
    if unknown:
        raise ConfigError(f"init_data={source!r} has label(s) {unknown[:5]} that the task's "
                          f"labels {list(label_names)} lack")
    frame = frame.assign(label=names.map(task_ids)).head(config.init_examples)
    if len(frame) < config.init_examples:
        logger.warning("init data %s has %d records, fewer than init_examples=%d; using all",
                       source, len(frame), config.init_examples)
    file = _source_file(source)
    reference = {
        "source": source, "text_column": config.init_text_column,
        "text_pair_column": config.init_text_pair_column,
        "label_column": config.init_label_column, "records": len(frame),
        "records_sha256": _records_sha256(frame),
        "file_sha256": _file_sha256(file) if file else None,
    }
    dataset = TokenizedDataset(frame, tokenizer, max_length=config.max_length)
    return PublicInitData(dataset=dataset, reference=reference)


def init_record(config: Any, public: PublicInitData | None) -> dict[str, Any]:
    """The init as the ledger's metadata records it (read back by ``fedsb-dp audit``)."""
    record: dict[str, Any] = {"method": config.init}
    if config.init == "gradient-svd":
        record.update(source=config.init_source, examples=config.init_examples)
        if config.init_source == "dp":
            record.update(noise_multiplier=config.init_noise_multiplier,
                          clip_norm=config.init_clip_norm, sampling="poisson")
        if public is not None:
            record["data"] = public.reference
    return record
