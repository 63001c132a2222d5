"""A node's own privacy policy (no model, no Flower): what it refuses, and its own ledger."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from accounting import FederatedPlan, PrivacyLedger, calibrate_noise_multiplier
from accounting.cli import main as account_main
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.node_policy import (
    AnnouncedPlan,
    NodePrivacyPolicy,
    NodeRefusalError,
    default_ledger_path,
)

# dp_accounting's RDP warns per skipped order at small σ (as the CLI and server silence it).
logging.getLogger("absl").setLevel(logging.ERROR)

N = 120
DELTA = 1e-5
BASE = dict(private=True, dp_level="example", target_epsilon=8.0, target_delta=DELTA,
            allow_large_delta=False, rounds=3, local_steps=2, expected_batch_size=8,
            max_grad_norm=3.0, accountant="rdp", seeded=True, setup_digest="setup")


def _server_sigma(sizes: dict[str, int], **plan) -> float:
    """σ as the server calibrates it: one σ for the whole federation (its worst client)."""
    settings = {**BASE, **plan}
    return calibrate_noise_multiplier(
        target_epsilon=settings["target_epsilon"], target_delta=settings["target_delta"],
        plan=FederatedPlan({c: settings["expected_batch_size"] / n for c, n in sizes.items()},
                           local_steps=settings["local_steps"], rounds=settings["rounds"]),
        accountant=settings["accountant"]).noise_multiplier


@pytest.fixture(scope="module")
def honest_sigma() -> float:
    return _server_sigma({"client-0": N, "client-1": 200})


def _plan(sigma: float, **change) -> AnnouncedPlan:
    return AnnouncedPlan(**{**BASE, "noise_multiplier": sigma, **change})


def _bytes(path: str) -> bytes | None:
    return open(path, "rb").read() if os.path.exists(path) else None


def test_honest_rounds_are_reserved_before_and_committed_after(tmp_path, honest_sigma):
    policy = NodePrivacyPolicy(ledger_path=str(tmp_path / "node.json"))
    plan = _plan(honest_sigma)
    # The worst client's own calibration is the server's σ exactly: the honest run passes.
    assert policy.required_noise_multiplier(plan, client_id="client-0",
                                            num_records=N) == honest_sigma
    for round_index in range(3):
        reservation = policy.begin_round(plan, client_id="client-0", num_records=N,
                                         round_index=round_index)
        on_disk = PrivacyLedger.load(policy.ledger_path)
        assert on_disk.pending == [reservation.token]  # charged before any training
        assert on_disk.steps("client-0") == 2 * (round_index + 1)
        policy.commit(reservation)
    ledger = PrivacyLedger.load(policy.ledger_path)
    assert ledger.pending == [] and ledger.steps("client-0") == 6
    assert ledger.metadata["plan_digest"] == plan.digest()
    assert ledger.metadata["required_noise_multiplier"] == honest_sigma
    # The node's ledger is an ordinary ledger: `fedsb-dp account` recomputes its ε.
    assert account_main(["account", policy.ledger_path, "--accountant", "rdp"]) == 0


@pytest.mark.parametrize("change, match", [
    (lambda s: {"noise_multiplier": s / 2}, "refuses noise multiplier"),
    # Just below the calibration: round 1 alone would still fit the node's budget guard.
    (lambda s: {"noise_multiplier": s * 0.97}, "refuses noise multiplier"),
    (lambda s: {"noise_multiplier": 0.0}, "must be a finite number > 0"),
    (lambda s: {"private": False, "target_epsilon": None, "noise_multiplier": 0.0},
     "non-private plan"),
    (lambda s: {"dp_level": "client"}, "record-level"),
    (lambda s: {"max_grad_norm": 3.5}, "clip norm C=3.5"),
    (lambda s: {"rounds": 5}, "at most 3"),
    (lambda s: {"local_steps": 3}, "3 local steps per round: this node allows at most 2"),
    (lambda s: {"expected_batch_size": N + 1}, "expected batch size"),
])
def test_plans_outside_the_policy_are_refused_and_nothing_is_written(tmp_path, honest_sigma,
                                                                      change, match):
    policy = NodePrivacyPolicy(ledger_path=str(tmp_path / "node.json"), max_grad_norm=3.0,
                               max_rounds=3, max_local_steps=2)
    with pytest.raises(NodeRefusalError, match=match):
        policy.begin_round(_plan(honest_sigma, **change(honest_sigma)), client_id="client-0",
                           num_records=N, round_index=0)
    assert not os.path.exists(policy.ledger_path)


def test_own_target_is_stricter_than_the_servers(tmp_path, honest_sigma):
    policy = NodePrivacyPolicy(ledger_path=str(tmp_path / "node.json"), target_epsilon=4.0)
    with pytest.raises(NodeRefusalError, match=r"for ε=4, δ=1e-05 needs σ ≥"):
        policy.begin_round(_plan(honest_sigma), client_id="client-0", num_records=N,
                           round_index=0)
    # A larger σ that meets the node's own ε = 4 is accepted.
    own = policy.required_noise_multiplier(_plan(honest_sigma), client_id="client-0",
                                           num_records=N)
    assert own > honest_sigma
    policy.begin_round(_plan(own), client_id="client-0", num_records=N, round_index=0)


def test_extra_replayed_and_changed_rounds_are_refused_mid_run(tmp_path, honest_sigma):
    policy = NodePrivacyPolicy(ledger_path=str(tmp_path / "node.json"))
    plan = _plan(honest_sigma)
    for round_index in range(3):
        policy.commit(policy.begin_round(plan, client_id="client-0", num_records=N,
                                         round_index=round_index))
    before = _bytes(policy.ledger_path)
    refusals = [
        (plan, 3, "plan has rounds 1..3"),                       # an extra round
        (plan, 1, "already charged"),                            # a replayed round
        (_plan(honest_sigma * 2), 2, "changed plan"),            # σ changed mid-run
        (dataclasses.replace(plan, setup_digest="other"), 2, "changed plan"),
        (dataclasses.replace(plan, rounds=4, noise_multiplier=honest_sigma * 2), 3,
         "changed plan"),
    ]
    for sent, round_index, match in refusals:
        with pytest.raises(NodeRefusalError, match=match):
            policy.begin_round(sent, client_id="client-0", num_records=N,
                               round_index=round_index)
    assert _bytes(policy.ledger_path) == before  # refused rounds leave the ledger untouched


def test_a_crashed_round_stays_charged_and_is_not_rerun(tmp_path, honest_sigma):
    policy = NodePrivacyPolicy(ledger_path=str(tmp_path / "node.json"))
    plan = _plan(honest_sigma)
    policy.begin_round(plan, client_id="client-0", num_records=N, round_index=0)  # no commit
    with pytest.raises(NodeRefusalError, match="already charged"):
        policy.begin_round(plan, client_id="client-0", num_records=N, round_index=0)
    assert PrivacyLedger.load(policy.ledger_path).steps("client-0") == 2


def test_another_nodes_ledger_is_refused(tmp_path, honest_sigma):
    path = str(tmp_path / "node.json")
    NodePrivacyPolicy(ledger_path=path).begin_round(
        _plan(honest_sigma), client_id="client-0", num_records=N, round_index=0)
    with pytest.raises(NodeRefusalError, match="not this node's ledger"):
        NodePrivacyPolicy(ledger_path=path).begin_round(
            _plan(honest_sigma), client_id="client-1", num_records=200, round_index=1)


def test_node_config_values_and_ledger_location(tmp_path, monkeypatch):
    policy = NodePrivacyPolicy.from_node_config(
        {"target-epsilon": 2, "target-delta": 1e-6, "max-grad-norm": 1.5, "max-rounds": 4,
         "max-local-steps": 10, "accountant": "pld", "ledger-path": str(tmp_path / "l.json"),
         "partition-id": 0}, client_id="client-0", run_id=9)
    assert policy.limits() == {"target_epsilon": 2.0, "target_delta": 1e-6,
                               "max_grad_norm": 1.5, "max_rounds": 4, "max_local_steps": 10,
                               "accountant": "pld"}
    assert policy.ledger_path == str(tmp_path / "l.json")
    for key, value, match in [("target-epsilon", 0, "target-epsilon=0 must be a finite"),
                              ("max-rounds", 2.5, "max-rounds=2.5 must be an integer ≥ 1"),
                              ("target-delta", 1.5, r"target-delta=1.5 must be in \(0, 1\)"),
                              ("accountant", "gdp", "accountant='gdp' is not one of")]:
        with pytest.raises(ConfigError, match=match):
            NodePrivacyPolicy.from_node_config({key: value}, client_id="client-0", run_id=1)
    data = str(tmp_path / "own.csv")
    assert default_ledger_path({}, client_id="client-0", run_id=1, data_path=data) == (
        data + ".fedsb-node-ledger.json")
    monkeypatch.setenv("FEDSB_DP_NODE_DIR", str(tmp_path / "state"))
    assert default_ledger_path({}, client_id="client-1", run_id=7, data_path=None) == str(
        tmp_path / "state" / "run-7" / "client-1.ledger.json")


def test_per_client_sigma_agrees_with_the_nodes_own_and_below_it_is_refused(tmp_path):
    """--noise per-client sends each node its own σᵢ: exactly the node's own calibration."""
    from accounting import calibrate_per_client

    sizes = {"client-0": N, "client-1": 10 * N}
    per_client = calibrate_per_client(
        target_epsilon=BASE["target_epsilon"], target_delta=DELTA,
        plan=FederatedPlan({c: BASE["expected_batch_size"] / n for c, n in sizes.items()},
                           local_steps=BASE["local_steps"], rounds=BASE["rounds"]),
        accountant=BASE["accountant"])
    sigma_large = per_client["client-1"].noise_multiplier
    assert sigma_large < per_client["client-0"].noise_multiplier
    large = NodePrivacyPolicy(ledger_path=str(tmp_path / "large.json"))
    assert large.required_noise_multiplier(_plan(sigma_large), client_id="client-1",
                                           num_records=10 * N) == sigma_large
    large.commit(large.begin_round(_plan(sigma_large), client_id="client-1",
                                   num_records=10 * N, round_index=0))
    # A σᵢ just below the node's own calibration, and the large node's σ sent to the small
    # node, are refused before anything is charged.
    low = NodePrivacyPolicy(ledger_path=str(tmp_path / "low.json"))
    with pytest.raises(NodeRefusalError, match="client-1 refuses noise multiplier"):
        low.begin_round(_plan(sigma_large * (1 - 1e-3)), client_id="client-1",
                        num_records=10 * N, round_index=0)
    small = NodePrivacyPolicy(ledger_path=str(tmp_path / "small.json"))
    with pytest.raises(NodeRefusalError, match="client-0 refuses noise multiplier"):
        small.begin_round(_plan(sigma_large), client_id="client-0", num_records=N,
                          round_index=0)
    assert not os.path.exists(low.ledger_path) and not os.path.exists(small.ledger_path)
