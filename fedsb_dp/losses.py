"""Per-example losses, the quantity whose gradients DP-SGD clips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsb_dp.models import SEQUENCE_CLASSIFICATION


def example_losses(model: nn.Module, batch: dict[str, torch.Tensor], *, task: str) -> torch.Tensor:
    """One loss per example of the batch.

    Classification: cross-entropy of the head's logits. Causal LM: mean next-token
    cross-entropy over the example's non-padding tokens.

    Args:
        model: A ``transformers`` model (possibly wrapped by Opacus).
        batch: ``input_ids``, ``attention_mask`` (and ``token_type_ids``) plus ``labels``.
        task: ``"sequence-classification"`` or ``"causal-lm"``.

    Returns:
        A vector of shape (batch,).

    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if task == SEQUENCE_CLASSIFICATION:
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)
    token_losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none"
    )
    return (token_losses * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
