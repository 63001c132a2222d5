"""Sequence classification: a head on the encoder, cross-entropy per example."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fedsb_dp.data import TokenizedDataset, make_collate
from fedsb_dp.models import SEQUENCE_CLASSIFICATION
from fedsb_dp.tasks.base import Task
from fedsb_dp.tasks.classification_metrics import evaluate_classifier


def classification_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the head's logits, one per example."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


class ClassificationTask(Task):
    """Text (or text-pair) classification into ``label_names``.

    Args:
        label_names: Names of the classes, index = label id.
    """

    name = SEQUENCE_CLASSIFICATION

    def __init__(self, label_names: tuple[str, ...]) -> None:
        self.label_names = tuple(label_names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Accuracy, loss and macro-F1 (the names of the classifier's summary since v1)."""
        return ("accuracy", "loss", "macro_f1")

    def dataset(self, frame: pd.DataFrame, tokenizer: Any, *,
                max_length: int) -> torch.utils.data.Dataset:
        """Tokenised texts with integer labels."""
        return TokenizedDataset(frame, tokenizer, max_length=max_length)

    def collate(self, tokenizer: Any) -> Callable:
        """Pads each batch to its longest example (the tokenizer's padding side)."""
        return make_collate(tokenizer)

    def example_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per example."""
        return classification_losses(model, batch)

    def evaluate(self, model: nn.Module, dataset: torch.utils.data.Dataset,
                 collate: Callable, *, batch_size: int = 64) -> dict[str, Any]:
        """Accuracy, macro-F1 and mean cross-entropy."""
        return evaluate_classifier(model, dataset, collate, num_labels=len(self.label_names),
                                   batch_size=batch_size)
