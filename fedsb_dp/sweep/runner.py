"""Running a sweep: one run directory per cell, finished cells skipped, crashes resumed."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.sweep.spec import Cell, SweepSpec

logger = logging.getLogger(__name__)

SPEC_FILE = "sweep.json"
CELLS = "cells"
ERROR_FILE = "error.json"


def cell_dir(out: str, cell: Cell) -> str:
    """Where a cell's run lives."""
    return os.path.join(out, CELLS, cell.name)


def _claim_sweep_dir(spec: SweepSpec, out: str) -> None:
    path = os.path.join(out, SPEC_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            saved = SweepSpec.from_dict(json.load(fh)["spec"])
        if saved.digest() != spec.digest():
            raise ConfigError(f"{out!r} holds a different sweep; choose another --out or rerun "
                              "with the same specification to resume it")
        return
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"{out!r} exists and is not a sweep directory; choose another --out")
    os.makedirs(os.path.join(out, CELLS), exist_ok=True)
    rd.write_json_atomic(path, {"spec": spec.to_dict(), "created": time.time()})


def run_sweep(spec: SweepSpec, out: str, *, progress: bool = False,
              on_cell: Callable[[Cell, str], None] | None = None) -> dict[str, str]:
    """Run every cell not finished yet.

    A cell with ``summary.json`` is done and skipped; one with ``progress.json`` was
    interrupted and is resumed (its ledger already holds what it spent); a directory with
    neither never started training and is set aside (``*.incomplete-N``) and rerun. A cell
    that fails with a configuration error is recorded in ``error.json`` and the sweep goes on.

    Args:
        spec: The grid.
        out: Sweep directory (created; or an existing sweep of the same spec, resumed).
        progress: Show per-run progress bars.
        on_cell: Called with (cell, status) after each cell.

    Returns:
        Cell name → ``"skipped"``, ``"completed"``, ``"resumed"``, ``"failed"`` or the run
        status (e.g. ``"stopped-budget"``).
    """
    from fedsb_dp.federated.engine import run_federation

    _claim_sweep_dir(spec, out)
    statuses = {}
    for cell in spec.cells():
        path = cell_dir(out, cell)
        if os.path.exists(os.path.join(path, rd.SUMMARY)):
            statuses[cell.name] = "skipped"
        else:
            resume = os.path.exists(os.path.join(path, rd.PROGRESS))
            if os.path.exists(path) and not resume:
                suffix = 1
                while os.path.exists(f"{path}.incomplete-{suffix}"):
                    suffix += 1
                os.replace(path, f"{path}.incomplete-{suffix}")
            try:
                result = run_federation(cell.config(spec.base, out=path), resume=resume,
                                        progress=progress)
                statuses[cell.name] = "resumed" if resume and result.status == "completed" \
                    else result.status
            except (FedSBError, ValueError) as exc:
                logger.error("cell %s failed: %s", cell.name, exc)
                os.makedirs(path, exist_ok=True)
                rd.write_json_atomic(os.path.join(path, ERROR_FILE),
                                     {"error": f"{type(exc).__name__}: {exc}"})
                statuses[cell.name] = "failed"
        if on_cell is not None:
            on_cell(cell, statuses[cell.name])
    return statuses
