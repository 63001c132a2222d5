"""What a sweep will do before it does it: its cells, what is done, and a wall-time estimate.

The estimate counts work in *token-steps*: one DP-SGD step over an expected batch of
``batch_size`` examples padded to at most ``max_length`` tokens, so a cell costs
``clients × participation × rounds × local_steps × batch_size × max_length`` token-steps
plus a fixed time to load the model and data and to evaluate. The seconds per token-step come
from, in order of preference:

1. **this machine**: the finished cells of this sweep directory (their operator-only wall
   time, all of it — loading and evaluation included — divided by their token-steps; median);
2. **a constant** for the default MiniLM model only, :data:`MINILM_SECONDS_PER_TOKEN_STEP`:
   1.7 s for one DP-SGD step of a batch of 32 × 128 tokens (``benchmarks/dp_overhead.py`` on
   a quiet 2-core CPU, docs/benchmarks.md §3), plus :data:`CELL_OVERHEAD_S` per cell;
3. otherwise no estimate until a cell has finished (the sweep prints one then).

Padding is dynamic, so most batches are shorter than ``max_length``: the constant errs long.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass

from fedsb_dp.federated import run_dir as rd
from fedsb_dp.models import DEFAULT_MODEL
from fedsb_dp.sweep.spec import Cell, SweepSpec

#: Seconds per token-step of MiniLM with DP on a quiet 2-core CPU (1.7 s / (32 × 128)).
MINILM_SECONDS_PER_TOKEN_STEP = 1.7 / (32 * 128)
#: Seconds a MiniLM cell spends outside training: loading, calibration, evaluation.
CELL_OVERHEAD_S = 20.0
_MINILM_NAMES = (DEFAULT_MODEL, "minilm")


def token_steps(spec: SweepSpec, cell: Cell) -> float:
    """The training work of one cell, in expected token-steps (see the module docstring)."""
    config = cell.config(spec.settings_of(cell.method), out="/nonexistent")
    clients = 1 if config.method_is_central else config.clients
    return (clients * config.participation * config.rounds * config.local_steps
            * config.batch_size * config.max_length)


def is_done(path: str) -> bool:
    """Whether a cell's run finished (it has ``summary.json``)."""
    return os.path.exists(os.path.join(path, rd.SUMMARY))


def wall_time(path: str) -> float | None:
    """A finished cell's wall time from its operator-only log, if recorded.

    ``None`` for a cell that was interrupted and resumed (a ``"resumed"`` line in its log):
    its summary times the last attempt only, which would understate a whole cell.
    """
    try:
        with open(os.path.join(path, rd.OPERATOR), encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if any(r.get("kind") == "resumed" for r in lines):
        return None
    times = [r["wall_time_s"] for r in lines if r.get("kind") == "summary"
             and isinstance(r.get("wall_time_s"), int | float)]
    return times[-1] if times else None


@dataclass(frozen=True)
class Speed:
    """Seconds per token-step, the overhead per cell, and where they come from."""

    seconds_per_token_step: float
    overhead_s: float
    basis: str


def measured_speed(spec: SweepSpec, timed: dict[Cell, float]) -> Speed | None:
    """The speed measured on finished cells (their whole wall time over their token-steps)."""
    rates = [seconds / token_steps(spec, cell) for cell, seconds in timed.items()
             if token_steps(spec, cell) > 0]
    if not rates:
        return None
    return Speed(statistics.median(rates), 0.0,
                 f"measured on {len(rates)} finished cell(s) of this sweep on this machine")


def constant_speed(spec: SweepSpec) -> Speed | None:
    """The documented MiniLM constant, when every method of the sweep runs MiniLM."""
    models = {spec.settings_of(m).get("model", DEFAULT_MODEL) for m in spec.methods}
    if not models <= set(_MINILM_NAMES):
        return None
    return Speed(MINILM_SECONDS_PER_TOKEN_STEP, CELL_OVERHEAD_S,
                 "rough: MiniLM constant, 1.7 s per DP step of 32 × 128 tokens on a quiet "
                 f"2-core CPU, + {CELL_OVERHEAD_S:.0f} s per cell; padding is dynamic, so it "
                 "errs long")


def estimate_s(spec: SweepSpec, cells: list[Cell], speed: Speed, workers: int) -> float:
    """Wall seconds for ``cells`` at ``speed``, assuming cells spread evenly over workers."""
    total = sum(token_steps(spec, c) * speed.seconds_per_token_step + speed.overhead_s
                for c in cells)
    return total / max(1, min(workers, len(cells)))


def format_duration(seconds: float) -> str:
    """``42 s``, ``14 min``, ``3.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:g}"


def plan_lines(spec: SweepSpec, out: str, *, workers: int) -> list[str]:
    """The cells as a compact table (per method, ε and partition) and the estimate.

    Reads ``out`` (if it exists) to count finished cells; writes nothing.
    """
    from fedsb_dp.sweep.runner import cell_dir

    cells = spec.cells()
    done = {c for c in cells if is_done(cell_dir(out, c))}
    groups: Counter = Counter()
    finished: Counter = Counter()
    for cell in cells:
        key = (cell.method, cell.epsilon, cell.partition)
        groups[key] += 1
        finished[key] += cell in done
    lines = [f"sweep: {len(cells)} cells → {out}"
             + (f" ({len(done)} done, {len(cells) - len(done)} to run)" if done else "")]
    header = ("method", "ε", "partition", "ranks", "seeds", "cells", "done")
    rows = [(method, _eps(eps), partition,
             ",".join(str(r) for r in spec.ranks_of(method)),
             ",".join(str(s) for s in spec.seeds), str(count), str(finished[method, eps,
                                                                            partition]))
            for (method, eps, partition), count in groups.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(text.ljust(width)
                                      for text, width in zip(row, widths, strict=True)).rstrip())
    todo = [c for c in cells if c not in done]
    timed = {c: t for c in done if (t := wall_time(cell_dir(out, c))) is not None}
    speed = measured_speed(spec, timed) or constant_speed(spec)
    if not todo:
        lines.append("estimate: nothing to run (every cell is done)")
    elif speed is None:
        lines.append("estimate: none yet for this model (no constant, no finished cell here); "
                     "printed once the first cell finishes")
    else:
        lines.append(f"estimate: {len(todo)} cell(s) ≈ "
                     f"{format_duration(estimate_s(spec, todo, speed, workers))} with "
                     f"{workers} worker(s) ({speed.basis})")
    return lines
