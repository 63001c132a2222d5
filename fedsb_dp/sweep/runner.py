"""Running a sweep: one run directory per cell, finished cells skipped, crashes resumed."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from accounting import calibration_cache
from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.sweep.results import ERROR_FILE
from fedsb_dp.sweep.spec import Cell, SweepSpec

#: Sweep subdirectory of calibrated σ shared by its cells (unless the environment names one).
CALIBRATION_CACHE = "calibration-cache"

logger = logging.getLogger(__name__)

SPEC_FILE = "sweep.json"
CELLS = "cells"


def cell_dir(out: str, cell: Cell) -> str:
    """Where a cell's run lives."""
    return os.path.join(out, CELLS, cell.name)


def check_sweep_dir(spec: SweepSpec, out: str) -> str:
    """What running ``spec`` in ``out`` would do, without writing anything.

    A grid may grow or change its axes (more seeds, another ε or rank) in place, because a
    cell's run is fixed by its grid point and its method's settings: every method the two
    specifications share must have the same settings, else the finished cells would answer a
    different question and the directory is refused.

    Returns:
        ``"new"`` (no sweep there yet), ``"resume"`` (the same grid) or ``"extend"``.

    Raises:
        ConfigError: If ``out`` holds something else, or a sweep with other settings.
    """
    path = os.path.join(out, SPEC_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            saved = SweepSpec.from_dict(json.load(fh)["spec"])
        if saved.digest() == spec.digest():
            return "resume"
        changed = [m for m in spec.methods
                   if m in saved.methods and saved.settings_of(m) != spec.settings_of(m)]
        if changed:
            raise ConfigError(
                f"{out!r} holds a sweep whose settings for {changed} differ from this one's "
                f"(there: {[saved.settings_of(m) for m in changed]}); choose another --out, "
                "or change only the grid (epsilons, methods, ranks, partitions, seeds) to "
                "extend it")
        return "extend"
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"{out!r} exists and is not a sweep directory; choose another --out")
    return "new"


def _claim_sweep_dir(spec: SweepSpec, out: str) -> None:
    """Create the sweep directory, or resume or extend the sweep it holds (see above)."""
    state = check_sweep_dir(spec, out)
    path = os.path.join(out, SPEC_FILE)
    if state == "extend":
        with open(path, encoding="utf-8") as fh:
            saved_record = json.load(fh)
        logger.info("extending the sweep in %s to a new grid", out)
        rd.write_json_atomic(path, {
            **saved_record, "spec": spec.to_dict(),
            "previous_specs": [*saved_record.get("previous_specs", []),
                               SweepSpec.from_dict(saved_record["spec"]).to_dict()]})
    elif state == "new":
        os.makedirs(os.path.join(out, CELLS), exist_ok=True)
        rd.write_json_atomic(path, {"spec": spec.to_dict(), "created": time.time()})


def _run_cell(cell: Cell, base: dict, path: str, progress: bool,
              threads: int | None = None) -> str:
    """Run (or resume, or skip) one cell; returns its status.

    Module-level so a worker process can import and call it.
    """
    from fedsb_dp.federated.inprocess import run_federation

    if threads is not None:  # inside a worker process
        import torch

        from fedsb_dp.console import quiet_expected_warnings

        torch.set_num_threads(threads)
        quiet_expected_warnings()
    if os.path.exists(os.path.join(path, rd.SUMMARY)):
        return "skipped"
    resume = os.path.exists(os.path.join(path, rd.PROGRESS))
    if os.path.exists(path) and not resume:
        suffix = 1
        while os.path.exists(f"{path}.incomplete-{suffix}"):
            suffix += 1
        os.replace(path, f"{path}.incomplete-{suffix}")
    try:
        result = run_federation(cell.config(base, out=path), resume=resume, progress=progress)
    except (FedSBError, ValueError) as exc:
        logger.error("cell %s failed: %s", cell.name, exc)
        os.makedirs(path, exist_ok=True)
        rd.write_json_atomic(os.path.join(path, ERROR_FILE),
                             {"error": f"{type(exc).__name__}: {exc}"})
        return "failed"
    return "resumed" if resume and result.status == "completed" else result.status


def _worker_threads(workers: int) -> int:
    """Intra-op threads per worker: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_sweep(spec: SweepSpec, out: str, *, progress: bool = False,
              on_cell: Callable[[Cell, str], None] | None = None,
              workers: int = 1) -> dict[str, str]:
    """Run every cell not finished yet.

    A cell with ``summary.json`` is done and skipped; one with ``progress.json`` was
    interrupted and is resumed (its ledger already holds what it spent); a directory with
    neither never started training and is set aside (``*.incomplete-N``) and rerun. A cell
    that fails with a configuration error is recorded in ``error.json`` and the sweep goes on.

    With ``workers > 1`` the cells run in that many fresh (spawned) processes, each with
    ``cpu_count // workers`` intra-op threads: small models on CPU scale better over cells than
    over threads. Every cell is its own run directory with its own ledger and seed, so the
    results do not depend on the worker count (a seeded cell is reproducible at a given
    thread count; a different thread count may change float summation order).

    Args:
        spec: The grid.
        out: Sweep directory (created; or an existing sweep of the same spec, resumed).
        progress: Show per-run progress bars (ignored with several workers).
        on_cell: Called with (cell, status) after each cell, in completion order.
        workers: Cells run at once (≥ 1).

    Returns:
        Cell name → ``"skipped"``, ``"completed"``, ``"resumed"``, ``"failed"`` or the run
        status (e.g. ``"stopped-budget"``), in grid order.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a positive integer")
    _claim_sweep_dir(spec, out)
    # Cells of one grid share plans (every method and seed at one ε calibrates the same σ):
    # a cache in the sweep directory pays for each plan once; every σ it serves is re-verified
    # (accounting.calibration_cache). Spawned workers inherit the environment.
    variable = calibration_cache.ENVIRONMENT_VARIABLE
    if os.environ.get(variable):
        return _run_cells(spec, out, progress=progress, on_cell=on_cell, workers=workers)
    os.environ[variable] = os.path.join(out, CALIBRATION_CACHE)
    try:
        return _run_cells(spec, out, progress=progress, on_cell=on_cell, workers=workers)
    finally:
        del os.environ[variable]


def _run_cells(spec: SweepSpec, out: str, *, progress: bool,
               on_cell: Callable[[Cell, str], None] | None, workers: int) -> dict[str, str]:
    cells = spec.cells()
    statuses: dict[str, str] = {}
    if workers == 1:
        for cell in cells:
            settings = spec.settings_of(cell.method)
            statuses[cell.name] = _run_cell(cell, settings, cell_dir(out, cell), progress)
            if on_cell is not None:
                on_cell(cell, statuses[cell.name])
        return statuses
    threads = _worker_threads(workers)
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_run_cell, cell, spec.settings_of(cell.method),
                               cell_dir(out, cell), False, threads): cell for cell in cells}
        for future in as_completed(futures):
            cell = futures[future]
            try:
                statuses[cell.name] = future.result()
            except Exception as exc:  # a crashed worker must not stop the other cells
                logger.error("cell %s crashed: %s", cell.name, exc)
                statuses[cell.name] = "failed"
            if on_cell is not None:
                on_cell(cell, statuses[cell.name])
    return {cell.name: statuses[cell.name] for cell in cells}
