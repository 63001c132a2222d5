"""The on-disk calibration cache can only save time: every stored σ is re-verified."""

from __future__ import annotations

import json
import os

import pytest

from accounting import FederatedPlan, calibrate_noise_multiplier, calibrate_per_client
from accounting import calibration as calibration_module
from accounting.accountants import clear_epsilon_cache
from conftest import count_calls

PLAN = FederatedPlan(sampling_probabilities={"a": 0.02, "b": 0.02, "c": 0.05}, local_steps=5,
                     rounds=4)
TARGET = dict(target_epsilon=2.0, target_delta=1e-5, accountant="rdp")


@pytest.fixture()
def searches(monkeypatch):
    calls = count_calls(monkeypatch, calibration_module, "_search")
    clear_epsilon_cache()  # so a cache hit cannot hide behind the in-process memo
    return calls


def test_a_second_calibration_is_served_from_the_cache_with_the_same_answer(tmp_path,
                                                                              searches):
    fresh = calibrate_noise_multiplier(plan=PLAN, **TARGET)
    first = calibrate_noise_multiplier(plan=PLAN, cache_dir=str(tmp_path), **TARGET)
    again = calibrate_noise_multiplier(plan=PLAN, cache_dir=str(tmp_path), **TARGET)
    assert len(searches) == 2  # the uncached call and the first cached one
    assert first.noise_multiplier == again.noise_multiplier == fresh.noise_multiplier
    assert again.achieved_epsilon == fresh.achieved_epsilon <= TARGET["target_epsilon"]
    assert set(again.per_client) == {"a", "b", "c"}
    # Client names and order do not change σ, so they share the entry.
    renamed = FederatedPlan(sampling_probabilities={"z": 0.05, "y": 0.02, "x": 0.02},
                            local_steps=5, rounds=4)
    assert calibrate_noise_multiplier(plan=renamed, cache_dir=str(tmp_path),
                                      **TARGET).noise_multiplier == fresh.noise_multiplier
    assert len(searches) == 2 and len(os.listdir(tmp_path)) == 1


def test_a_tampered_entry_is_recomputed_and_ignored(tmp_path, searches):
    good = calibrate_noise_multiplier(plan=PLAN, cache_dir=str(tmp_path), **TARGET)
    (entry,) = tmp_path.iterdir()
    record = json.loads(entry.read_text())
    record["noise_multiplier"] = good.noise_multiplier / 2  # would spend far more than ε = 2
    entry.write_text(json.dumps(record))
    result = calibrate_noise_multiplier(plan=PLAN, cache_dir=str(tmp_path), **TARGET)
    assert result.noise_multiplier == good.noise_multiplier
    assert result.achieved_epsilon <= TARGET["target_epsilon"] and len(searches) == 2
    entry.write_text("{not json")
    assert calibrate_noise_multiplier(plan=PLAN, cache_dir=str(tmp_path),
                                      **TARGET).noise_multiplier == good.noise_multiplier


def test_every_part_of_the_query_is_in_the_key(tmp_path, searches, monkeypatch):
    monkeypatch.setenv("FEDSB_DP_CALIBRATION_CACHE", str(tmp_path))
    base = calibrate_noise_multiplier(plan=PLAN, **TARGET)
    other_target = calibrate_noise_multiplier(plan=PLAN, **{**TARGET, "target_epsilon": 4.0})
    other_delta = calibrate_noise_multiplier(plan=PLAN, **{**TARGET, "target_delta": 1e-7})
    longer = calibrate_noise_multiplier(
        plan=FederatedPlan(sampling_probabilities=PLAN.sampling_probabilities, local_steps=5,
                           rounds=5), **TARGET)
    assert len(searches) == 4 and len(os.listdir(tmp_path)) == 4
    assert other_target.noise_multiplier < base.noise_multiplier
    assert other_delta.noise_multiplier > base.noise_multiplier
    assert longer.noise_multiplier > base.noise_multiplier
    # Per-client σᵢ: one entry per distinct client plan, the shared plan's own among them.
    per_client = calibrate_per_client(plan=PLAN, **TARGET)
    assert per_client["c"].noise_multiplier == base.noise_multiplier
    assert per_client["a"].noise_multiplier < base.noise_multiplier
    assert len(os.listdir(tmp_path)) == 6
