"""What a run tells its operator while it works: status lines and one line per round.

The library only *says* things, through the ``fedsb_dp.progress`` logger at INFO; a front end
decides whether anyone hears them (:func:`fedsb_dp.console.show_narration`). ``fedsb-dp``
shows them on stderr, where the progress bars go, and keeps stdout for results (the summary,
tables), so ``fedsb-dp run … > result.txt`` captures the result alone. A library caller hears
nothing unless it asks.

The per-round line is built in one place (:func:`round_line`, called by the round protocol)
from the round's *released* record only: under client-level DP the cohort, its size and the
realised traffic stay with the operator, so the line cannot show them either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

LOGGER = "fedsb_dp.progress"
_logger = logging.getLogger(LOGGER)


def say(message: str) -> None:
    """Tell the operator what the run is doing now (heard only if a front end shows it)."""
    _logger.info(message)


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
