"""The results table of a sweep (or of loose run directories), ε recomputed from each ledger."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from accounting import PrivacyLedger, federation_epsilon
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated import run_dir as rd

RESULTS_FILE = "results.csv"
#: What a sweep leaves in a cell that was refused or failed: ``{"error": "<Type>: <message>"}``.
ERROR_FILE = "error.json"
#: Row order of every results table.
ROW_ORDER = ["partition", "method", "rank", "target_epsilon", "seed"]
#: Slack on "recomputed ε ≤ target" (float noise of the accountant, nothing more).
EPSILON_SLACK = 1e-9


def over_target(frame):
    """The runs (rows of ``collect_results``) whose recomputed ε exceeds their target."""
    return frame[frame["epsilon"] > frame["target_epsilon"] + EPSILON_SLACK]


def cells_root(path: str) -> str:
    """Where a sweep directory keeps its cells (``path/cells``), else ``path`` itself."""
    cells = os.path.join(path, "cells")
    return cells if os.path.isdir(cells) else path


def run_dirs(path: str) -> list[str]:
    """Run directories under ``path`` (itself, its ``cells/``, or its subdirectories)."""
    if os.path.exists(os.path.join(path, rd.SUMMARY)):
        return [path]
    root = cells_root(path)
    if not os.path.isdir(root):
        raise ConfigError(f"{path!r} is not a directory")
    found = sorted(os.path.join(root, d) for d in os.listdir(root)
                   if os.path.exists(os.path.join(root, d, rd.SUMMARY)))
    if not found:
        raise ConfigError(f"{path!r} holds no finished run (no {rd.SUMMARY} found)")
    return found


def is_unfinished(cell: str) -> bool:
    """Whether ``cell`` was refused or failed: it has ``error.json`` and no summary."""
    return (os.path.isfile(os.path.join(cell, ERROR_FILE))
            and not os.path.exists(os.path.join(cell, rd.SUMMARY)))


def _spent(ledger_path: str) -> bool:
    """Whether a ledger charges any client anything (reservations included).

    An unreadable or tampered ledger counts as spent: the safe reading for a report.
    """
    if not os.path.isfile(ledger_path):
        return False
    try:
        ledger = PrivacyLedger.load(ledger_path)
    except (OSError, ValueError):  # unreadable or failing its hash (AccountingError)
        return True
    return any(ledger.steps(client, kind=None) for client in ledger.clients)


def unfinished_cells(path: str) -> list[dict[str, Any]]:
    """Cells under ``path`` that were refused or failed (``error.json``, no summary).

    A sweep records why a cell did not run (say, a Dirichlet draw that leaves some client
    fewer records than a batch) and goes on; a report must say so, else the grid silently
    loses that seed.

    Returns:
        One ``{"run", "path", "error", "spent"}`` per such cell, by name; ``spent`` tells
        whether its ledger charges any release (a cell refused before training has none).
    """
    root = cells_root(path)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        cell = os.path.join(root, name)
        if not is_unfinished(cell):
            continue
        found.append({"run": name, "path": cell,
                      "error": _read(os.path.join(cell, ERROR_FILE)).get("error", "?"),
                      "spent": _spent(os.path.join(cell, rd.LEDGER))})
    return found


def unfinished_reason(cell: Mapping[str, Any]) -> str:
    """Why a cell of :func:`unfinished_cells` did not run, and whether it spent budget."""
    spent = "its ledger records releases" if cell["spent"] else "no budget spent"
    return f"{cell['error']} ({spent})"


def _read(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def run_row(path: str) -> dict[str, Any]:
    """One run as a row: grid point, utility, ε recomputed from its ledger, noise, traffic."""
    summary = _read(os.path.join(path, rd.SUMMARY))
    config = _read(os.path.join(path, rd.CONFIG))["config"]
    settings = rd.saved_settings(config)  # settings added later read as older runs used them
    private = not config.get("no_dp", False)
    if private:
        ledger = PrivacyLedger.load(os.path.join(path, rd.LEDGER))
        delta = summary["privacy"]["delta"]
        result = federation_epsilon(ledger, delta=delta, accountant=config["accountant"])
        epsilon = result.epsilon
    else:
        epsilon, delta = math.inf, summary["privacy"].get("delta")
    sigma = summary["noise_multiplier"]
    # A summary from before noised_parameters (RoLoRA's per-round d) has only the total.
    d = summary.get("noised_parameters", summary["trainable_parameters"])
    clip = config["max_grad_norm"]
    return {
        "run": os.path.basename(os.path.normpath(path)),
        "method": config.get("method", "fedsb"), "rank": config["rank"],
        "partition": config.get("partition", "iid"), "seed": config.get("seed"),
        "target_epsilon": config["epsilon"] if private else math.inf,
        "epsilon": epsilon, "claimed_epsilon": summary["privacy"]["epsilon"], "delta": delta,
        "noise_multiplier": sigma, "trainable_parameters": d, "max_grad_norm": clip,
        # Expected norm of one step's noise on the sum: σ·C·√d.
        "noise_norm_per_step": sigma * clip * math.sqrt(d),
        # A causal-LM run on free-form responses has no accuracy; an LM run has no macro-F1.
        "test_accuracy": summary.get("test_accuracy"),
        "test_macro_f1": summary.get("test_macro_f1"),
        "test_loss": summary["test_loss"], "status": summary["status"],
        # Client-level runs keep Nᵢ operator-only: count clients from the config then.
        "rounds": summary["rounds_completed"],
        "clients": len(summary["clients"]) if "clients" in summary else config.get("clients"),
        "bytes_setup": summary["bytes_setup"], "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "bytes_total": summary["bytes_setup"] + summary["bytes_up"] + summary["bytes_down"],
        # Older summaries carry it; current runs keep timings in the operator-only log,
        # which an archive leaves out, so a results table never depends on it.
        "wall_time_s": summary.get("wall_time_s"),
        # the training budget, so cells run at different settings are never mistaken for peers
        "learning_rate": config.get("learning_rate"), "batch_size": config.get("batch_size"),
        "local_steps": config.get("local_steps"), "init": config.get("init"),
        "num_clients": config.get("clients"), "model": config.get("model"),
        "participation": config.get("participation", 1.0),
        "noise": settings["noise"],
        "dataset": config.get("dataset"), "max_length": config.get("max_length"),
        "max_train_records": config.get("max_train_records"),
        "max_eval_records": config.get("max_eval_records"),
        "eval_sample": settings["eval_sample"],
    }


def collect_results(path: str, *, write: bool = True):
    """Rows of every finished run under ``path`` (pandas DataFrame), written to results.csv."""
    import pandas as pd

    frame = pd.DataFrame([run_row(p) for p in run_dirs(path)])
    frame = frame.sort_values(ROW_ORDER, kind="stable").reset_index(drop=True)
    if write:
        frame.to_csv(os.path.join(path, RESULTS_FILE), index=False)
    return frame
