"""Calibration of σ over a whole plan, inverse questions, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting import (
    FederatedPlan,
    GaussianDpEvent,
    PoissonSampledDpEvent,
    PrivacyLedger,
    SelfComposedDpEvent,
    calibrate_noise_multiplier,
    epsilon_for_plan,
    max_rounds_within_budget,
)
from accounting.errors import AccountingError
from accounting.events import sampled_gaussian_event


def _plan(q=0.04, steps=2000, rounds=1, **kwargs):
    return FederatedPlan(sampling_probabilities={"a": q}, local_steps=steps, rounds=rounds,
                         **kwargs)


def test_opacus_orientation_pair():
    prv = calibrate_noise_multiplier(target_epsilon=8, target_delta=1e-5, plan=_plan())
    assert prv.noise_multiplier == pytest.approx(1.2915, abs=2e-3)
    assert prv.achieved_epsilon <= 8
    rdp = calibrate_noise_multiplier(target_epsilon=8, target_delta=1e-5, plan=_plan(),
                                     accountant="rdp")
    assert rdp.noise_multiplier == pytest.approx(1.3562, abs=3e-3)


@settings(max_examples=4, deadline=None)
@given(target=st.floats(0.5, 10.0), q=st.floats(0.005, 0.2), steps=st.integers(5, 200))
def test_calibration_never_overshoots(target, q, steps):
    plan = _plan(q=q, steps=steps)
    result = calibrate_noise_multiplier(target_epsilon=target, target_delta=1e-5, plan=plan,
                                        accountant="pld")
    assert result.achieved_epsilon <= target
    # and is tight: 1 % less noise would overshoot
    assert epsilon_for_plan(noise_multiplier=result.noise_multiplier * 0.99,
                            target_delta=1e-5, plan=plan, accountant="pld") > target


def test_calibration_covers_every_client_and_the_init():
    plan = FederatedPlan(sampling_probabilities={"small": 0.1, "big": 0.001}, local_steps=20,
                         rounds=5)
    result = calibrate_noise_multiplier(target_epsilon=2.0, target_delta=1e-6, plan=plan,
                                        accountant="pld")
    assert result.per_client["small"].epsilon == result.achieved_epsilon
    with_init = FederatedPlan(sampling_probabilities={"small": 0.1, "big": 0.001},
                              local_steps=20, rounds=5,
                              init_events={"small": GaussianDpEvent(4.0),
                                           "big": GaussianDpEvent(4.0)})
    costlier = calibrate_noise_multiplier(target_epsilon=2.0, target_delta=1e-6, plan=with_init,
                                          accountant="pld")
    assert costlier.noise_multiplier > result.noise_multiplier
    assert costlier.achieved_epsilon <= 2.0


def test_whole_run_not_per_round():
    one_round = calibrate_noise_multiplier(target_epsilon=3.0, target_delta=1e-5,
                                           plan=_plan(q=0.01, steps=50, rounds=1),
                                           accountant="pld")
    ten_rounds = calibrate_noise_multiplier(target_epsilon=3.0, target_delta=1e-5,
                                            plan=_plan(q=0.01, steps=50, rounds=10),
                                            accountant="pld")
    assert ten_rounds.noise_multiplier > one_round.noise_multiplier
    assert epsilon_for_plan(noise_multiplier=one_round.noise_multiplier, target_delta=1e-5,
                            plan=_plan(q=0.01, steps=50, rounds=10), accountant="pld") > 3.0


def test_participation_counts_only_joined_rounds():
    plan = FederatedPlan(sampling_probabilities={"a": 0.05, "b": 0.05}, local_steps=10,
                         rounds=10, participation={"a": [0, 1, 2], "b": list(range(10))})
    a = plan.client_event("a", 1.0)
    b = plan.client_event("b", 1.0)
    assert a.events[-1].count == 30 and b.events[-1].count == 100


def test_the_plan_charges_the_same_step_event_as_the_client_and_the_node():
    # Calibration, the client's ledger entry and a Flower node's reservation all build the
    # DP-SGD step with sampled_gaussian_event; σ and q must land in their own fields.
    step = PoissonSampledDpEvent(0.05, GaussianDpEvent(1.3))
    assert sampled_gaussian_event(sampling_probability=0.05, noise_multiplier=1.3) == step
    event = _plan(q=0.05, steps=10, rounds=3).client_event("a", 1.3)
    assert event.events == (SelfComposedDpEvent(step, 30),)


def test_unreachable_targets_name_the_knob():
    plan = _plan(q=0.1, steps=10, init_events={"a": GaussianDpEvent(0.5)})
    with pytest.raises(AccountingError, match="initialisation alone"):
        calibrate_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, plan=plan)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon=0.0"),
        ({"target_epsilon": -1.0}, "target_epsilon=-1.0"),
        ({"target_delta": 0.0}, "target_delta=0.0"),
        ({"target_delta": 1.0}, "target_delta=1.0"),
    ],
)
def test_bad_calibration_input(kwargs, message):
    values = {"target_epsilon": 1.0, "target_delta": 1e-5, "plan": _plan(steps=10), **kwargs}
    with pytest.raises(AccountingError, match=message):
        calibrate_noise_multiplier(**values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling_probabilities": {"a": 0.0}}, "= 0.0 must be in"),
        ({"sampling_probabilities": {"a": 1.5}}, "= 1.5 must be in"),
        ({"local_steps": -3}, "= -3 must be"),
        ({"rounds": -1}, "rounds=-1"),
    ],
)
def test_bad_plan(kwargs, message):
    values = {"sampling_probabilities": {"a": 0.1}, "local_steps": 5, "rounds": 2, **kwargs}
    with pytest.raises(AccountingError, match=message):
        FederatedPlan(**values)


def test_sigma_must_be_positive_when_private():
    with pytest.raises(AccountingError, match="noise_multiplier=0"):
        epsilon_for_plan(noise_multiplier=0, target_delta=1e-5, plan=_plan())


def test_max_rounds_within_budget():
    plan = _plan(q=0.01, steps=50, rounds=0)
    rounds = max_rounds_within_budget(noise_multiplier=1.0, target_epsilon=3.0,
                                      target_delta=1e-5, plan=plan, accountant="pld")
    assert rounds > 1
    at = epsilon_for_plan(noise_multiplier=1.0, target_delta=1e-5,
                          plan=_plan(q=0.01, steps=50, rounds=rounds), accountant="pld")
    beyond = epsilon_for_plan(noise_multiplier=1.0, target_delta=1e-5,
                              plan=_plan(q=0.01, steps=50, rounds=rounds + 1), accountant="pld")
    assert at <= 3.0 < beyond


def _run(*args):
    return subprocess.run([sys.executable, "-m", "accounting", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_calibrate_and_account(tmp_path):
    out = _run("calibrate", "--epsilon", "3", "--delta", "1e-5", "--clients", "3", "--rounds",
               "3", "--local-steps", "10", "--sampling-rate", "0.01")
    assert out.returncode == 0, out.stderr
    assert "σ = " in out.stdout and "prv:" in out.stdout and "rdp:" in out.stdout
    ledger = PrivacyLedger(dataset_sizes={"a": 1000, "b": 2000}, target_epsilon=3.0,
                           target_delta=1e-5)
    ledger.record("a", PoissonSampledDpEvent(0.05, GaussianDpEvent(1.0)), count=20)
    path = tmp_path / "ledger.json"
    ledger.save(str(path))
    within = _run("account", str(path))
    assert within.returncode == 0, within.stdout + within.stderr
    assert "federation ε" in within.stdout and "[pld]" in within.stdout
    ledger.record("a", PoissonSampledDpEvent(0.05, GaussianDpEvent(1.0)), count=2000)
    ledger.save(str(path))
    above = _run("account", str(path), "--accountant", "prv")
    assert above.returncode == 3 and "ABOVE TARGET" in above.stdout
    document = json.loads(path.read_text())
    document["body"]["entries"][0]["count"] = 1
    path.write_text(json.dumps(document))
    tampered = _run("account", str(path))
    assert tampered.returncode == 2 and "sha256" in tampered.stderr
    bad = _run("calibrate", "--epsilon", "-1", "--delta", "1e-5", "--clients", "1",
               "--rounds", "1", "--local-steps", "1", "--sampling-rate", "0.1")
    assert bad.returncode == 2 and "target_epsilon=-1.0" in bad.stderr
