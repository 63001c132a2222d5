"""Per-example losses, the quantity whose gradients DP-SGD clips, by task name."""

from __future__ import annotations

import torch
from torch import nn

from fedsb_dp.errors import ConfigError
from fedsb_dp.models import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from fedsb_dp.tasks.causal_lm import response_losses
from fedsb_dp.tasks.classification import classification_losses

_LOSSES = {SEQUENCE_CLASSIFICATION: classification_losses, CAUSAL_LM: response_losses}


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor], *, task: str) -> torch.Tensor:
    """One loss per example of the batch.

    Classification: cross-entropy of the head's logits. Causal LM: mean cross-entropy over the
    example's own response tokens (:func:`fedsb_dp.tasks.causal_lm.response_losses`).

    Args:
        model: A ``transformers`` model (possibly wrapped by Opacus).
        batch: A batch from the task's collate function.
        task: ``"sequence-classification"`` or ``"causal-lm"``.

    Returns:
        A vector of shape (batch,).

    Raises:
        ConfigError: For an unknown task.

    """
    if task not in _LOSSES:
        raise ConfigError(f"task={task!r} is not one of {tuple(_LOSSES)}")
    return _LOSSES[task](model, batch)
