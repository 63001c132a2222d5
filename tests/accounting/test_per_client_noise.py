"""Per-client noise σᵢ: calibration, the v2 recorded plan, and the audit against it."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from accounting import (
    AccountingError,
    FederatedPlan,
    PrivacyLedger,
    RecordedPlan,
    calibrate_noise_multiplier,
    calibrate_per_client,
    federation_epsilon,
)
from accounting.audit import audit_run
from accounting.events import sampled_gaussian_event

TARGET, DELTA = 3.0, 1e-5
BATCH, STEPS, ROUNDS = 16, 3, 2
# A skewed split: the smallest client sets the shared σ. RDP calibrates in milliseconds (the
# audit still recomputes PRV and PLD).
SIZES = {"client-0": 160, "client-1": 640, "client-2": 2_560}
ACCOUNTANT = "rdp"


def _plan() -> FederatedPlan:
    return FederatedPlan(sampling_probabilities={c: BATCH / n for c, n in SIZES.items()},
                         local_steps=STEPS, rounds=ROUNDS)


@pytest.fixture(scope="module")
def calibrated():
    per_client = calibrate_per_client(target_epsilon=TARGET, target_delta=DELTA, plan=_plan(),
                                      accountant=ACCOUNTANT)
    shared = calibrate_noise_multiplier(target_epsilon=TARGET, target_delta=DELTA,
                                        plan=_plan(), accountant=ACCOUNTANT).noise_multiplier
    return {c: r.noise_multiplier for c, r in per_client.items()}, shared


def _ledger(sigmas: dict[str, float], charged: dict[str, float]) -> PrivacyLedger:
    """A ledger whose plan announces ``sigmas`` and whose steps are charged at ``charged``."""
    plan = RecordedPlan(
        unit="example", rounds=ROUNDS, local_steps=STEPS,
        sampling_probabilities={c: BATCH / n for c, n in SIZES.items()},
        noise_multiplier=max(sigmas.values()), clip_norm=1.0, accountant=ACCOUNTANT,
        target_epsilon=TARGET, target_delta=DELTA, noise_multipliers=dict(sigmas))
    ledger = PrivacyLedger(
        unit="example", dataset_sizes=dict(SIZES), target_epsilon=TARGET, target_delta=DELTA,
        metadata={"seed_mode": "os-entropy", "noise_is_release": True, "sampling": "poisson",
                  "noise_multiplier": max(sigmas.values()), "noise": "per-client",
                  "noise_multipliers": dict(sigmas), "max_grad_norm": 1.0},
        plan=plan)
    for r in range(ROUNDS):
        for cid, n in SIZES.items():
            ledger.record(cid, sampled_gaussian_event(sampling_probability=BATCH / n,
                                                      noise_multiplier=charged[cid]),
                          count=STEPS, round_index=r)
    return ledger


def _run_dir(path, ledger: PrivacyLedger) -> str:
    """A run directory around ``ledger`` whose summary claims what the ledger recomputes."""
    os.makedirs(path)
    ledger.save(os.path.join(path, "ledger.json"))
    digest = hashlib.sha256(b"per-client").hexdigest()
    files = {
        "config.json": {"config": {}, "digest": digest},
        "provenance.json": {"config_digest": digest, "versions": {"opacus": "1.6.0"},
                            "seed_mode": "os-entropy"},
    }
    result = federation_epsilon(ledger, accountant=ACCOUNTANT)
    files["summary.json"] = {"seed_mode": "os-entropy", "privacy": {
        "epsilon": result.epsilon, "accountant": ACCOUNTANT, "delta": DELTA,
        "per_client_epsilon": {c: r.epsilon for c, r in result.per_client.items()}}}
    for name, data in files.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        for r in range(ROUNDS):
            fh.write(json.dumps({"round": r + 1, "participants": list(SIZES)}) + "\n")
    return str(path)


def test_each_client_meets_the_target_and_large_clients_add_less_noise(calibrated):
    sigmas, shared = calibrated
    ledger = _ledger(sigmas, sigmas)
    per_client = federation_epsilon(ledger, delta=DELTA, accountant=ACCOUNTANT).per_client
    for cid in SIZES:  # each client's ε, recomputed from the ledger, is at the target
        assert TARGET * 0.99 <= per_client[cid].epsilon <= TARGET, (cid, per_client[cid])
    assert sigmas["client-2"] < sigmas["client-1"] < sigmas["client-0"]
    assert sigmas["client-2"] < shared, (sigmas, shared)
    # The smallest client is the shared σ's worst case: the same calibration.
    assert sigmas["client-0"] == pytest.approx(shared, rel=2e-3)


def test_plan_round_trips_as_v2_and_v1_stays_unchanged(calibrated):
    sigmas, _ = calibrated
    plan = _ledger(sigmas, sigmas).plan
    data = plan.to_dict()
    assert data["format"] == "fedsb-dp/plan/v2" and data["noise_multipliers"] == sigmas
    assert RecordedPlan.from_dict(data) == plan
    assert plan.sigma_of("client-2") == sigmas["client-2"]
    shared = RecordedPlan(**{**plan.__dict__, "noise_multipliers": None})
    assert shared.to_dict()["format"] == "fedsb-dp/plan/v1"
    assert "noise_multipliers" not in shared.to_dict()
    with pytest.raises(AccountingError, match="need unit 'example'"):
        RecordedPlan(**{**plan.__dict__, "unit": "client"})
    with pytest.raises(AccountingError, match="must be the largest"):
        RecordedPlan(**{**plan.__dict__, "noise_multiplier": min(sigmas.values())})


def test_audit_passes_per_client_run_and_catches_smallest_clients_sigma_charged(
        tmp_path, calibrated):
    sigmas, _ = calibrated
    clean = audit_run(_run_dir(tmp_path / "clean", _ledger(sigmas, sigmas)))
    assert clean.passed, clean.format()
    # Planted: every client trained with its own σᵢ, but the ledger charges all of them the
    # smallest client's (largest) σ, which understates the larger clients' ε.
    worst = max(sigmas.values())
    planted = audit_run(_run_dir(tmp_path / "planted",
                                 _ledger(sigmas, {c: worst for c in SIZES})))
    assert not planted.passed
    name, ok, detail = next(c for c in planted.checks if c[0] == "step events match the plan")
    assert not ok and "client-2 σ" in detail and f"{sigmas['client-2']:.6g}" in detail, detail
