"""The accounting package's own tests judge calibration itself: no σ cache here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_calibration_cache(monkeypatch):
    monkeypatch.delenv("FEDSB_DP_CALIBRATION_CACHE", raising=False)
