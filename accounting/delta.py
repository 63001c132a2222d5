"""The δ policy: one δ, below 1/N_total, used both to calibrate and to report.

A δ of 1/N or more admits mechanisms that publish a whole record with probability δ·N ≥ 1
(the authors' δ = 1/#batches is of that kind). It is refused unless explicitly overridden,
and an overridden δ is flagged in every report.
"""

from __future__ import annotations

import math

from accounting.errors import AccountingError, DeltaPolicyError


def check_delta(delta: float, *, n_total: int, allow_large: bool = False) -> bool:
    """Validate δ against the number of records.

    Args:
        delta: The δ to use.
        n_total: Records over all clients (N_total ≥ 1).
        allow_large: Accept δ ≥ 1/N_total (for reproducing papers); the return value then
            says the run must be flagged.

    Returns:
        True when δ ≥ 1/N_total was accepted through ``allow_large`` (flag it), else False.

    Raises:
        AccountingError: δ outside (0, 1) or a non-positive N.
        DeltaPolicyError: δ ≥ 1/N_total without ``allow_large``.
    """
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 1:
        raise AccountingError(f"n_total={n_total!r} must be a positive integer")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise AccountingError(f"delta={delta!r} must be in (0, 1)")
    if delta >= 1 / n_total:
        if allow_large:
            return True
        raise DeltaPolicyError(
            f"delta={delta:g} is not below 1/N_total = 1/{n_total} = {1 / n_total:.3g}; choose "
            f"delta < {1 / n_total:.3g} (default {default_delta(n_total):g}), or pass the "
            "explicit large-delta override (the run is then flagged)")
    return False


def default_delta(n_total: int) -> float:
    """min(1e-5, 1/(10·N_total)), rounded down to one significant digit.

    Ten times below 1/N keeps the chance that any record is exposed by the δ-part small
    (≤ 0.1 by a union bound), and 1e-5 is the customary ceiling for datasets under 10⁴ records.
    """
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 1:
        raise AccountingError(f"n_total={n_total!r} must be a positive integer")
    value = min(1e-5, 1.0 / (10.0 * n_total))
    exponent = math.floor(math.log10(value))
    mantissa = math.floor(value / 10.0**exponent + 1e-9)
    return float(f"{mantissa}e{exponent}")
