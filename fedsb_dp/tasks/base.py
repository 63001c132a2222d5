"""What a task is: how records become batches, the per-example loss, and the held-out metrics.

Clients, the private initialisation and the evaluator all go through the same :class:`Task`,
so a batch is built, and a loss computed, the same way for training and for evaluation. The
round protocol and both drivers only see metric names and values; nothing above this layer
branches on the task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn


class Task(ABC):
    """One kind of supervised fine-tuning (classification, causal language modelling).

    Attributes:
        name: The ``RunConfig.task`` value (also what ``load_model`` takes).
        label_names: Names of the labels (classification, or a causal-LM label task);
            empty for free-form responses.
    """

    name: ClassVar[str]
    label_names: tuple[str, ...]

    @abstractmethod
    def dataset(self, frame: pd.DataFrame, tokenizer: Any, *,
                max_length: int) -> torch.utils.data.Dataset:
        """Tokenise standardised records (columns ``text``, maybe ``text_pair``, ``label``)."""

    @abstractmethod
    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """A function that pads a list of tokenised examples into one batch of tensors."""

    @abstractmethod
    def example_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example, shape (batch,): the quantity whose gradient DP-SGD clips.

        Each entry must depend on its own example only (no batch-wide normalisation), or the
        per-sample gradients would not be the examples' own and clipping would not bound
        one record's influence.
        """

    @abstractmethod
    def evaluate(self, model: nn.Module, dataset: torch.utils.data.Dataset,
                 collate: Callable, *, batch_size: int = 64) -> dict[str, Any]:
        """Held-out metrics of ``model``: keys of :attr:`metric_names` plus ``examples``."""

    @property
    @abstractmethod
    def metric_names(self) -> tuple[str, ...]:
        """Names of the per-round metrics (``validation_<name>``, ``test_<name>``)."""
