"""What a run tells its operator while it works: status lines and one line per round.

The library only *says* things, through the ``fedsb_dp.progress`` logger at INFO; a front end
decides whether anyone hears them (:func:`show`). ``fedsb-dp`` shows them on stderr, where the
progress bars go, and keeps stdout for results (the summary, tables), so ``fedsb-dp run … >
result.txt`` captures the result alone. A library caller hears nothing unless it asks.

The per-round line is built in one place (:func:`round_line`, called by the round protocol)
from the round's *released* record only: under client-level DP the cohort, its size and the
realised traffic stay with the operator, so the line cannot show them either.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import IO, Any

LOGGER = "fedsb_dp.progress"
_logger = logging.getLogger(LOGGER)
_HANDLER_MARK = "_fedsb_dp_narration"


def say(message: str) -> None:
    """Tell the operator what the run is doing now (heard only if a front end :func:`show`-s)."""
    _logger.info(message)


def show(enabled: bool = True, stream: IO[str] | None = None) -> None:
    """Print narration to ``stream`` (stderr by default), or silence it.

    Idempotent: calling it again replaces the earlier handler.

    Args:
        enabled: Whether lines are printed.
        stream: Where they go; ``None`` is ``sys.stderr`` at the time of each line (so pytest's
            capture sees them).
    """
    for handler in list(_logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            _logger.removeHandler(handler)
    _logger.propagate = False  # never twice, whatever the root logger does with -v
    if not enabled:
        _logger.setLevel(logging.WARNING)
        return
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A handler that looks ``sys.stderr`` up for every line (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def _epsilon(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "∞ (non-private)"
    return f"{value:.4f}"


def round_line(released: Mapping[str, Any], *, rounds: int,
               target_epsilon: float | None) -> str:
    """The one line printed after a round, from its released ``metrics.jsonl`` record.

    Args:
        released: The record as written to ``metrics.jsonl`` (nothing operator-only).
        rounds: Rounds planned.
        target_epsilon: The run's target (``None`` for a non-private run).

    Returns:
        E.g. ``round 2/3  validation accuracy 0.7312  ε spent 2.1034 of 3``.
    """
    parts = [f"round {released['round']}/{rounds}"]
    if "validation_perplexity" in released:  # a causal LM: response loss, exact-match if any
        shown = [("loss", released.get("validation_loss")),
                 ("exact-match", released.get("validation_accuracy"))]
    else:
        shown = [("accuracy", released.get("validation_accuracy"))]
    values = [f"{name} {value:.4f}" for name, value in shown if value is not None]
    if values:
        parts.append("validation " + ", ".join(values))
    elif released.get("aggregated") is False:
        parts.append("not aggregated (the model stays; see metrics.jsonl)")
    epsilon = released.get("epsilon")
    spent = f"ε spent {_epsilon(epsilon)}"
    if target_epsilon is not None and epsilon is not None and math.isfinite(epsilon):
        spent += f" of {target_epsilon:g}"
    parts.append(spent)
    return "  ".join(parts)
