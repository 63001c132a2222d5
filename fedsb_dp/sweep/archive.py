"""Keep a sweep's audit trail without its weights, and fold earlier results into a report.

A finished cell holds adapters and checkpoints (megabytes) next to the few JSON files that an
audit needs: its config, ledger, per-round metrics, provenance and summary. Archiving copies
only those (the config without the run's own ``out`` path), so a published benchmark stays
small and ``fedsb-dp report`` can still recompute every ε from the archived ledgers.
``partition.json`` stays behind: its exact per-client label counts are not a DP release.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.sweep.results import ERROR_FILE, is_unfinished, run_dirs, unfinished_cells

#: Files a report and an ε audit read; everything else in a run directory stays behind.
AUDIT_FILES = (rd.CONFIG, rd.LEDGER, rd.METRICS, rd.PROVENANCE, rd.SUMMARY)

#: Columns a results.csv must have to be merged into a report.
MERGE_COLUMNS = ("run", "method", "rank", "partition", "seed", "target_epsilon", "epsilon",
                 "test_accuracy", "test_macro_f1", "noise_multiplier", "trainable_parameters",
                 "noise_norm_per_step", "bytes_total")


def archived_config(path: str) -> dict:
    """A run's ``config.json`` as an archive keeps it: without the run's ``out`` path.

    ``out`` named the directory on the machine that ran the cell (an absolute path there);
    in an archive it is neither true nor needed, and it is outside the config digest
    (:meth:`RunConfig.digest`), so dropping it keeps the provenance check intact.
    """
    record = rd.read_json(path)
    record["config"] = {k: v for k, v in record["config"].items() if k != "out"}
    return record


def _same(run: str, target: str, name: str) -> bool:
    theirs = os.path.join(target, name)
    if not os.path.exists(theirs):
        return False
    if name == rd.CONFIG:
        return archived_config(os.path.join(run, name)) == archived_config(theirs)
    return filecmp.cmp(os.path.join(run, name), theirs, shallow=False)


def archive_runs(source: str, dest: str) -> list[str]:
    """Copy the audit files of every finished run under ``source`` to ``dest/cells/<run>/``.

    Each cell is written to a temporary directory and renamed into place, so an interrupted
    archive never leaves a half-copied cell. A cell already in ``dest`` is left alone when its
    files are identical and refused otherwise: an archive is never silently rewritten. A cell
    that was refused or failed keeps its ``error.json`` (with its config and any ledger), so
    the archive's report names it; archived that way, it is replaced once it has finished.

    Args:
        source: A sweep directory, a directory of runs, or one run.
        dest: The archive directory (created if missing).

    Returns:
        The archived cell directories, in ``source`` order.

    Raises:
        ConfigError: If ``source`` holds neither a finished run nor a refused cell, or ``dest``
            holds a different run of the same name.
    """
    refused = unfinished_cells(source)
    try:
        finished = run_dirs(source)
    except ConfigError:
        if not refused:
            raise
        finished = []  # only refused cells: their records are still worth keeping
    cells = os.path.join(dest, "cells")
    os.makedirs(cells, exist_ok=True)
    done = []
    for run in finished:
        name = os.path.basename(os.path.normpath(run))
        target = os.path.join(cells, name)
        present = [f for f in AUDIT_FILES if os.path.exists(os.path.join(run, f))]
        if is_unfinished(target):  # archived when it had failed; it has finished since
            shutil.rmtree(target)
        if os.path.exists(target):
            same = all(_same(run, target, f) for f in present)
            if not same:
                raise ConfigError(f"{target!r} already archives a different run named "
                                  f"{name!r}; archive to another directory")
            done.append(target)
            continue
        _copy_cell(run, present, cells, name)
        done.append(target)
    # A refused or failed cell keeps its reason (and its ledger, if it spent anything), so
    # the archive's report still says which seed is missing and why.
    for cell in refused:
        if not os.path.exists(os.path.join(cells, cell["run"])):
            present = [f for f in (ERROR_FILE, rd.CONFIG, rd.LEDGER)
                       if os.path.exists(os.path.join(cell["path"], f))]
            _copy_cell(cell["path"], present, cells, cell["run"])
    return done


def _copy_cell(run: str, files: list[str], cells: str, name: str) -> None:
    """Copy ``files`` of ``run`` to ``cells/name`` through a staging directory.

    The config loses the machine's ``out`` path; the rename makes the cell appear whole or
    not at all.
    """
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=cells)
    for f in files:
        if f == rd.CONFIG:
            rd.write_json_atomic(os.path.join(staging, f), archived_config(os.path.join(run, f)))
        else:
            shutil.copy2(os.path.join(run, f), os.path.join(staging, f))
    os.replace(staging, os.path.join(cells, name))


def read_merged_results(path: str):
    """Rows of an earlier ``results.csv`` to report next to recomputed ones.

    Their ε was recomputed from the ledgers when that file was written; the rows keep the
    file's name in a ``source`` column so a report can say which rows it did not recompute.

    Args:
        path: A results.csv written by :func:`fedsb_dp.sweep.results.collect_results`.

    Returns:
        A DataFrame of the file's rows.

    Raises:
        ConfigError: If the file is missing or lacks a needed column.
    """
    import pandas as pd

    if not os.path.isfile(path):
        raise ConfigError(f"results file {path!r} does not exist")
    frame = pd.read_csv(path)
    missing = [c for c in MERGE_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path!r} lacks the column(s) {missing}; merge a results.csv "
                          "written by fedsb-dp sweep or fedsb-dp report")
    frame["source"] = os.path.basename(path)
    return frame
