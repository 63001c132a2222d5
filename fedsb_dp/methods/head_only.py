"""Head only: no adapter; the classification head (and a trained pooler) is all that trains.

The private linear-probe baseline. It runs through the same DP-SGD client, the same σ
calibration, ledger and byte accounting as every adapter method, so an adapter's gain is
measured against what the head alone learns at the same ε. The server's mean of the heads is
exact: the head is linear in its own weights, and nothing else changes. A round costs the
head's size on the wire, and there is no one-time broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsb_dp.adapters.inject import mark_trainable
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods.base import SB_LEARNING_RATE, FederatedMethod

#: The ``adapter`` kind of a method that injects nothing.
NO_ADAPTER = "none"


class HeadOnly(FederatedMethod):
    """Private head-only baseline (no adapter, the head trained and averaged)."""

    name = "head-only"
    adapter = NO_ADAPTER
    exact = True
    description = "no adapter: only the classification head (and pooler) trained, averaged"
    # Not tuned on its own: the step size the head already takes inside Fed-SB runs, where
    # Fed-SB at r = 1 (almost all of it head) was as accurate as any rank (docs/benchmarks.md).
    default_learning_rate = SB_LEARNING_RATE

    def __init__(self, *, rank: int, scaling: float = 1.0, dropout: float = 0.0,
                 train_head: bool = True, train_pooler: bool = False) -> None:
        super().__init__(rank=rank, scaling=scaling, dropout=dropout, train_head=train_head,
                         train_pooler=train_pooler)
        if not train_head:
            raise ConfigError("method='head-only' trains the classification head and nothing "
                              "else; it needs train_head=True (drop --frozen-head) on a "
                              "sequence-classification task")

    def inject(self, model: nn.Module, targets: Mapping[str, nn.Linear], *,
               generator: torch.Generator, factors: Mapping[str, object] | None = None) -> None:
        """Inject nothing: freeze the model, unfreeze the head (and pooler) by identity."""
        del targets, generator, factors
        mark_trainable(model, train_head=self.train_head, train_pooler=self.train_pooler)
