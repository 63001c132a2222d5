"""Splitting the training records among clients (disjoint and complete)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedsb_dp.errors import ConfigError


def iid_partition(num_records: int, *, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle record indices with a seeded generator and cut them into near-equal parts.

    Args:
        num_records: Records to distribute.
        num_clients: Number of clients (≥ 1, ≤ num_records).
        seed: Seed of the partitioning stream.

    Returns:
        One sorted index array per client; together they hold every index exactly once.

    Raises:
        ConfigError: If there are no clients or fewer records than clients.

    """
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be ≥ 1")
    if num_records < num_clients:
        raise ConfigError(
            f"num_clients={num_clients} exceeds the {num_records} training records: every "
            "client needs at least one record"
        )
    order = np.random.default_rng(seed).permutation(num_records)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def client_frames(frame: pd.DataFrame, parts: list[np.ndarray]) -> dict[str, pd.DataFrame]:
    """Client id (``"client-0"``, …) → that client's records."""
    out = {}
    for index, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(f"client-{index} received no records")
        out[f"client-{index}"] = frame.iloc[part].reset_index(drop=True)
    return out
