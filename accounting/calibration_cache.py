"""An optional on-disk record of calibrated σ, re-verified on every use.

Calibrating σ for a plan runs tens of accountant queries (seconds to minutes); a sweep or a test
suite calibrates the same plan over and over, in separate processes. With a cache directory
(``cache_dir=`` or the environment variable ``FEDSB_DP_CALIBRATION_CACHE``), the σ found for a
plan is stored under a key made of everything the answer depends on: each distinct client
history of the plan (sampling rate, steps, init event), the targets, the accountant, the
tolerance and the accountant libraries' versions.

A stored σ is never trusted: :func:`lookup` recomputes ε at that σ with the judging accountant
and returns it only if the worst client still meets the target; otherwise (an edited file, a
changed library) it is ignored and the caller calibrates afresh. So the cache can only save
time — a wrong entry costs one accountant query, never privacy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from importlib import metadata

from accounting.accountants import FederationResult

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "FEDSB_DP_CALIBRATION_CACHE"
#: Bump when the calibration algorithm changes what σ it returns for the same query.
ALGORITHM_VERSION = 1


def cache_directory(cache_dir: str | None) -> str | None:
    """The directory to use: the argument, else the environment variable, else none."""
    return cache_dir or os.environ.get(ENVIRONMENT_VARIABLE) or None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(histories: list[str], *, kind: str, target_epsilon: float, target_delta: float,
              accountant: str, tolerance: float) -> str:
    """A digest of everything a calibration's answer depends on.

    Args:
        histories: One string per *distinct* client history (order and client names do not
            change σ, so they are not part of the key).
        kind: ``"shared"`` (one σ for the plan) or ``"per-client"``.
        target_epsilon: ε target.
        target_delta: δ.
        accountant: The judging accountant.
        tolerance: Relative tolerance of the search.

    Returns:
        A hex SHA-256 digest.
    """
    body = {"histories": sorted(set(histories)), "kind": kind,
            "target_epsilon": repr(float(target_epsilon)),
            "target_delta": repr(float(target_delta)), "accountant": accountant,
            "tolerance": repr(float(tolerance)), "algorithm": ALGORITHM_VERSION,
            "libraries": {name: _version(name) for name in ("prv-accountant", "dp-accounting",
                                                            "scipy", "numpy")}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def lookup(directory: str, key: str, *, target_epsilon: float,
           verify: Callable[[float], FederationResult]) -> tuple[float, FederationResult] | None:
    """A stored σ for ``key`` and its freshly recomputed ε, if it still meets the target.

    Args:
        directory: The cache directory.
        key: From :func:`cache_key`.
        target_epsilon: ε target.
        verify: σ → the plan's federation ε at σ, from the judging accountant.

    Returns:
        ``(σ, result)``, or ``None`` when there is no usable entry.
    """
    path = os.path.join(directory, f"{key}.json")
    try:
        with open(path, encoding="utf-8") as fh:
            sigma = float(json.load(fh)["noise_multiplier"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 < sigma < float("inf"):
        return None
    result = verify(sigma)
    if not result.epsilon <= target_epsilon:
        logger.warning("calibration cache entry %s gives ε = %.6g > target %s; recalibrating",
                       path, result.epsilon, target_epsilon)
        return None
    return sigma, result


def store(directory: str, key: str, sigma: float, *, description: dict[str, object]) -> None:
    """Write an entry atomically (a concurrent reader sees the old file or the new one)."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"noise_multiplier": sigma, **description}, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, f"{key}.json"))
