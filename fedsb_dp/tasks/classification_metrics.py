"""Held-out evaluation: example-level accuracy, macro-F1 and mean loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedsb_dp.devices import device_of, to_device


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    num_labels: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of ``model`` on ``dataset``.

    The evaluation split belongs to the evaluator, not to any client, so these numbers are not
    privacy releases about client records.
    """
    was_training = model.training
    model.eval()
    predictions, labels, losses = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    device = device_of(model)
    for batch in loader:
        target = batch.pop("labels")
        # Metrics are computed on the CPU in float32, whatever the model's device and dtype.
        logits = model(**to_device(batch, device)).logits.to("cpu", torch.float32)
        losses.append(F.cross_entropy(logits, target, reduction="sum").item())
        predictions.append(logits.argmax(dim=-1))
        labels.append(target)
    model.train(was_training)
    predicted = torch.cat(predictions)
    truth = torch.cat(labels)
    f1s = []
    for label in range(num_labels):
        tp = ((predicted == label) & (truth == label)).sum().item()
        fp = ((predicted == label) & (truth != label)).sum().item()
        fn = ((predicted != label) & (truth == label)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": (predicted == truth).double().mean().item(),
        "macro_f1": sum(f1s) / num_labels,
        "loss": sum(losses) / len(truth),
        "examples": len(truth),
    }
