"""The run directory: config, ledger, metrics, checkpoints, provenance — written atomically.

Layout::

    config.json        the RunConfig (and its digest)
    ledger.json        the privacy ledger (accounting's format)
    metrics.jsonl      one line per completed round
    progress.json      completed rounds, σ, partition seed, fingerprint (for --resume)
    provenance.json    versions, git commit, config digest, seed mode
    init_adapter/      the agreed B, A, R⁰ and head (so a resume never re-runs the init)
    checkpoint.safetensors   the global trainable state after the last completed round
    final_adapter/     B, A, R̄, head of the finished run (+ merged/, peft/ on request)
    summary.json       the final report (ε recomputed from ledger.json)
    operator.jsonl     operator-only: timings, realised cohorts, per-client traffic, stop
                       details (never archived or published; see ``release.py``)
    data.json          operator-only: digest of the rows trained on (``data_record.py``)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from fedsb_dp.errors import ConfigError

#: Settings added after runs were already saved, with the value those runs used: a saved
#: config without the key gets it here (a new run gets the field's default).
SAVED_RUN_DEFAULTS = {"eval_sample": "head", "noise": "shared"}


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings (``config.json``'s ``config``) with the values of later ones."""
    return {**SAVED_RUN_DEFAULTS, **saved}

CONFIG = "config.json"
LEDGER = "ledger.json"
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
PROVENANCE = "provenance.json"
INIT_ADAPTER = "init_adapter"
CHECKPOINT = "checkpoint.safetensors"
FINAL_ADAPTER = "final_adapter"
SUMMARY = "summary.json"
OPERATOR = "operator.jsonl"
DATA = "data.json"


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON via a temp file, fsync and rename, so a crash leaves old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def default_run_dir(base: str = "runs") -> str:
    """A fresh timestamped directory name under ``base``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = os.path.join(base, f"run-{stamp}")
    suffix = 1
    while os.path.exists(candidate):
        candidate = os.path.join(base, f"run-{stamp}-{suffix}")
        suffix += 1
    return candidate


def check_new_run_dir(path: str) -> None:
    """Refuse a run directory that already holds files (checked before any work starts).

    Raises:
        ConfigError: If ``path`` exists and is not empty (resume it with ``--resume`` instead).
    """
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConfigError(
            f"run directory {path!r} already exists and is not empty; nothing was overwritten. "
            "Use --resume to continue it, or choose another --out"
        )


def claim_new_run_dir(path: str) -> None:
    """Create ``path`` for a new run, re-checking that it is still free."""
    check_new_run_dir(path)
    os.makedirs(path, exist_ok=True)


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(config_digest: str, *, seeded: bool) -> dict[str, Any]:
    """Versions, commit, machine and seed mode, for the run directory."""
    versions = {}
    for package in ("fedsb-dp", "torch", "opacus", "transformers", "peft", "prv-accountant",
                    "dp-accounting", "numpy", "scipy", "pandas", "datasets", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(),
        "config_digest": config_digest,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "seed_mode": (
            "seeded: DP noise is reproducible and is NOT a private release"
            if seeded else "os-entropy: DP noise drawn from OS entropy"
        ),
    }
