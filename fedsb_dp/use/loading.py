"""Rebuilding a run's trained model from its base model and saved adapter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.models import CAUSAL_LM

if TYPE_CHECKING:
    from fedsb_dp.models import LoadedModel


def with_device(config: RunConfig, device: str | None) -> RunConfig:
    """``config`` on another device (``None``: its own); the device is not part of a run."""
    if device is None or device == config.device:
        return config
    return RunConfig.from_dict({**config.to_dict(), "device": device})


def check_label_names(config: RunConfig, label_names: Sequence[str], where: str) -> None:
    """A classifier needs its label names to size its head; a causal LM does not.

    Raises:
        ConfigError: If a classification run records fewer than two label names.
    """
    if config.task != CAUSAL_LM and len(label_names) < 2:
        raise ConfigError(f"{where!r} records no label names (no summary.json or data.json); "
                          "resume the run to the end first")


def assemble(config: RunConfig, label_names: Sequence[str], adapter_dir: str, *,
             checkpoint: str | None = None, device: str | None = None) -> LoadedModel:
    """The base model with a saved adapter (and optionally a later checkpoint), in eval mode.

    Args:
        config: The run's settings (model, task, pooling, method, rank, targets).
        label_names: Class names of a classifier (ignored for a causal LM).
        adapter_dir: A directory written by the method's ``save_adapter``.
        checkpoint: A ``checkpoint.safetensors`` to restore on top (the last completed
            round of an unfinished run).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``; default: the run's.

    Returns:
        The model with its adapters (and, for a classifier, ``id2label``/``label2id``).
    """
    from safetensors.torch import load_file

    from fedsb_dp.federated.setup import load_base_model, make_method, targets_of

    config = with_device(config, device)
    classifier = config.task != CAUSAL_LM
    loaded = load_base_model(config, num_labels=len(label_names) if classifier else 2)
    model, method = loaded.model, make_method(config)
    method.load_adapter(model, adapter_dir, targets_of(config, model))
    if checkpoint is not None:
        method.restore(model, load_file(checkpoint))
    if classifier:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model.eval()
    return loaded


def adapter_paths(run_dir: str, *, finished: bool, rounds_done: int,
                  ) -> tuple[str, str | None]:
    """The adapter directory and checkpoint (if any) holding a run's latest model."""
    from fedsb_dp.federated import run_dir as rd

    final = os.path.join(run_dir, rd.FINAL_ADAPTER)
    if finished and os.path.isdir(final):
        return final, None
    checkpoint = os.path.join(run_dir, rd.CHECKPOINT) if rounds_done > 0 else None
    return os.path.join(run_dir, rd.INIT_ADAPTER), checkpoint
