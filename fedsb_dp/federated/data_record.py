"""What a run trained on, recorded so that a resume refuses different data.

A run on a file or hub dataset can re-read it on resume; a run on in-memory data cannot, so
the caller passes the data again. Either way the rows must be the ones the run started with:
the plan fixed every client's Nᵢ and sampling probability q = B/Nᵢ, and the seeded partition
follows the row order. ``data.json`` therefore holds the digest of the rows read and the
label names, and :func:`check_same_data` compares before anything is loaded or spent.

The digest is a deterministic function of every private record (whoever holds a candidate
dataset could confirm it), so ``data.json`` is operator-only: never archived or published.
"""

from __future__ import annotations

import os
from typing import Any

from fedsb_dp.data import IN_MEMORY_DATASET, TextClassificationData
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated import run_dir as rd


def data_record(data: TextClassificationData,
                dataset_config: str | None = None) -> dict[str, Any]:
    """The ``data.json`` content of a run on ``data``.

    Args:
        data: The loaded dataset (its :attr:`~TextClassificationData.digest` is required).
        dataset_config: The hub dataset's configuration, if any.

    Returns:
        Source, configuration, where each split came from, digest, label names and a note
        that the file stays with the operator.
    """
    return {
        "source": data.source, "in_memory": data.source == IN_MEMORY_DATASET,
        "dataset_config": dataset_config, "splits": dict(data.splits),
        "digest": data.digest, "label_names": list(data.label_names),
        "privacy": "operator-only: a hash of the private records; never publish",
    }


def check_same_data(run_directory: str, data: TextClassificationData) -> None:
    """Refuse data other than the ones the run in ``run_directory`` started with.

    A run without ``data.json`` (written before the digest existed, or by the Flower server,
    whose nodes hold the data) is not checked.

    Args:
        run_directory: The run to resume.
        data: The data just loaded for it.

    Raises:
        ConfigError: If the digests differ, or an in-memory run has no recorded digest.
    """
    path = os.path.join(run_directory, rd.DATA)
    if not os.path.exists(path):
        if data.source == IN_MEMORY_DATASET:
            raise ConfigError(f"{run_directory!r} records no digest of its in-memory data "
                              f"({rd.DATA} is missing), so the data cannot be checked; start "
                              "a new run")
        return
    recorded = rd.read_json(path)
    if recorded.get("digest") != data.digest:
        what = "the in-memory data" if data.source == IN_MEMORY_DATASET else repr(data.source)
        raise ConfigError(
            f"{what} differ from the data run {run_directory!r} started with (digest in "
            f"{rd.DATA}); the plan's Nᵢ, q and partition follow those rows, so resume only "
            "with exactly the same rows in the same order, or start a new run")
