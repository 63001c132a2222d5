"""Ledger: JSON round trips, integrity, append-only saves, reservations, federation ε."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accounting import (
    BudgetExceededError,
    BudgetGuard,
    ComposedDpEvent,
    GaussianDpEvent,
    LedgerIntegrityError,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    PrivacyLedger,
    RecordedPlan,
    SampledWithoutReplacementDpEvent,
    SelfComposedDpEvent,
    compute_epsilon,
    event_from_dict,
    federation_epsilon,
)
from accounting.errors import AccountingError, DeltaPolicyError
from accounting.events import from_dp_accounting, to_dp_accounting

STEP = PoissonSampledDpEvent(0.01, GaussianDpEvent(1.0))

ALL_EVENTS = [
    NoOpDpEvent(), NonPrivateDpEvent(), GaussianDpEvent(1.3), STEP,
    SampledWithoutReplacementDpEvent(100, 10, GaussianDpEvent(2.0)),
    SelfComposedDpEvent(STEP, 7),
    ComposedDpEvent((GaussianDpEvent(4.0), SelfComposedDpEvent(STEP, 3), NoOpDpEvent())),
]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_event_json_and_dp_accounting_round_trips(event):
    data = json.loads(json.dumps(event.to_dict()))
    assert event_from_dict(data) == event
    assert from_dp_accounting(to_dp_accounting(event)) == event


def test_unknown_event_types_are_refused():
    with pytest.raises(LedgerIntegrityError, match="unknown event type 'Laplace'"):
        event_from_dict({"type": "Laplace", "parameter": 1.0})
    with pytest.raises(LedgerIntegrityError, match="malformed"):
        event_from_dict({"type": "Gaussian", "noise_multiplier": 1.0, "code": "import os"})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GaussianDpEvent(-1.0), "noise_multiplier=-1.0"),
        (lambda: PoissonSampledDpEvent(1.5, GaussianDpEvent(1.0)), "sampling_probability=1.5"),
        (lambda: PoissonSampledDpEvent(-0.1, GaussianDpEvent(1.0)), "sampling_probability=-0.1"),
        (lambda: SelfComposedDpEvent(STEP, -2), "count=-2"),
        (lambda: SampledWithoutReplacementDpEvent(10, 20, STEP), "sample_size=20"),
    ],
)
def test_bad_event_values(build, message):
    with pytest.raises(AccountingError, match=message):
        build()


def _ledger(**kwargs):
    values = dict(dataset_sizes={"a": 500, "b": 5000, "c": 50000}, target_epsilon=3.0,
                  target_delta=1e-6)
    values.update(kwargs)
    return PrivacyLedger(**values)


def test_runs_are_merged_so_long_ledgers_stay_small(tmp_path):
    ledger = _ledger()
    for round_index in range(1000):
        for cid in ledger.clients:
            token = ledger.reserve({cid: (STEP, 50)}, round_index=round_index)
            ledger.commit(token)
    path = tmp_path / "ledger.json"
    ledger.save(str(path))
    assert os.path.getsize(path) < 5000
    assert all(ledger.steps(cid) == 50_000 for cid in ledger.clients)
    loaded = PrivacyLedger.load(str(path))
    assert loaded.to_json_dict() == ledger.to_json_dict()
    assert loaded.to_json_dict()["body"]["entries"][0]["rounds"] == [0, 999]


def test_federation_epsilon_is_the_max_over_clients():
    # Same batch size 50 on N = 500, 5 000, 50 000: q = 0.1, 0.01, 0.001.
    ledger = _ledger()
    for cid, n in ledger.dataset_sizes.items():
        ledger.record(cid, PoissonSampledDpEvent(50 / n, GaussianDpEvent(1.0)), count=100)
    result = federation_epsilon(ledger, accountant="pld")
    eps = {cid: r.epsilon for cid, r in result.per_client.items()}
    assert result.epsilon == max(eps.values()) == eps["a"]
    assert result.worst_client == "a"
    assert eps["a"] > eps["b"] > eps["c"]
    assert result.epsilon > sum(eps.values()) / 3  # an average would be too small
    reordered = _ledger(dataset_sizes={"c": 50000, "a": 500, "b": 5000})
    for cid in ("c", "b", "a"):
        n = reordered.dataset_sizes[cid]
        reordered.record(cid, PoissonSampledDpEvent(50 / n, GaussianDpEvent(1.0)), count=100)
    assert federation_epsilon(reordered, accountant="pld").epsilon == result.epsilon


def test_client_history_equals_composition():
    ledger = _ledger()
    ledger.record("a", GaussianDpEvent(8.0), kind="init")
    ledger.record("a", STEP, count=30, round_index=0)
    ledger.record("a", STEP, count=30, round_index=1)
    direct = compute_epsilon(ComposedDpEvent((GaussianDpEvent(8.0),
                                              SelfComposedDpEvent(STEP, 60))), delta=1e-6)
    assert compute_epsilon(ledger.client_event("a"), delta=1e-6).epsilon == direct.epsilon


def test_non_private_release_makes_epsilon_infinite_visibly():
    ledger = _ledger()
    ledger.record("b", NonPrivateDpEvent(), kind="init")
    result = federation_epsilon(ledger)
    assert result.epsilon == float("inf") and result.worst_client == "b"
    assert result.per_client["b"].non_private


def test_corrupted_truncated_edited_ledgers_are_refused(tmp_path):
    ledger = _ledger()
    ledger.record("a", STEP, count=10)
    path = tmp_path / "ledger.json"
    ledger.save(str(path))
    text = path.read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    with pytest.raises(LedgerIntegrityError, match="not valid JSON"):
        PrivacyLedger.load(str(tmp_path / "truncated.json"))
    edited = json.loads(text)
    edited["body"]["entries"][0]["count"] = 1  # hide 9 steps
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(LedgerIntegrityError, match="sha256"):
        PrivacyLedger.load(str(tmp_path / "edited.json"))
    wrong_schema = json.loads(text)
    wrong_schema["schema"] = "other/v9"
    (tmp_path / "schema.json").write_text(json.dumps(wrong_schema))
    with pytest.raises(LedgerIntegrityError, match="schema"):
        PrivacyLedger.load(str(tmp_path / "schema.json"))


def test_append_only_saves(tmp_path):
    path = str(tmp_path / "ledger.json")
    ledger = _ledger()
    ledger.record("a", STEP, count=10)
    ledger.save(path)
    ledger.record("a", STEP, count=5)
    ledger.save(path)  # growth is fine
    forgetful = _ledger()
    forgetful.record("a", STEP, count=3)
    with pytest.raises(LedgerIntegrityError, match="shrank|drop"):
        forgetful.save(path)
    other_target = _ledger(target_epsilon=8.0)
    with pytest.raises(LedgerIntegrityError, match="target_epsilon"):
        other_target.save(path)
    assert PrivacyLedger.load(path).steps("a") == 15
    assert sorted(os.listdir(tmp_path)) == ["ledger.json"]  # no temp files left


def test_reservation_counts_before_commit(tmp_path):
    path = str(tmp_path / "ledger.json")
    ledger = _ledger()
    guard = BudgetGuard(ledger, target_epsilon=3.0, delta=1e-6, accountant="pld")
    guard.reserve_round({"a": (STEP, 100)}, round_index=0)
    ledger.save(path)  # ... and the process dies here
    crashed = PrivacyLedger.load(path)
    assert crashed.pending and crashed.steps("a") == 100
    assert federation_epsilon(crashed, accountant="pld").epsilon > 0


def test_budget_guard_refuses_before_writing():
    ledger = _ledger()
    guard = BudgetGuard(ledger, target_epsilon=1.0, delta=1e-6, accountant="pld")
    token = guard.reserve_round({"a": (STEP, 10)}, round_index=0)
    guard.commit(token)
    before = ledger.to_json_dict()
    with pytest.raises(BudgetExceededError) as info:
        guard.reserve_round({"a": (PoissonSampledDpEvent(0.5, GaussianDpEvent(0.5)), 100)},
                            round_index=1)
    assert info.value.projected_epsilon > 1.0 and info.value.worst_client == "a"
    assert "round 2" in str(info.value)
    assert ledger.to_json_dict() == before


def test_delta_policy():
    with pytest.raises(DeltaPolicyError, match=r"delta=0\.001 is not below 1/N_total"):
        PrivacyLedger(dataset_sizes={"a": 600, "b": 600}, target_epsilon=1.0, target_delta=1e-3)
    flagged = PrivacyLedger(dataset_sizes={"a": 600, "b": 600}, target_epsilon=1.0,
                            target_delta=1e-3, allow_large_delta=True)
    assert flagged.large_delta
    with pytest.raises(AccountingError, match="delta=1.5"):
        PrivacyLedger(dataset_sizes={"a": 600}, target_epsilon=1.0, target_delta=1.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon=0.0"),
        ({"target_epsilon": -2.0}, "target_epsilon=-2.0"),
        ({"dataset_sizes": {"a": 0}}, "dataset size of 'a' = 0"),
        ({"unit": "user"}, "unit='user'"),
    ],
)
def test_bad_ledger_input(kwargs, message):
    with pytest.raises(AccountingError, match=message):
        _ledger(**kwargs)


def test_bad_record_input():
    ledger = _ledger()
    with pytest.raises(AccountingError, match="count=-1"):
        ledger.record("a", STEP, count=-1)
    with pytest.raises(AccountingError, match="unknown client 'zz'"):
        ledger.record("zz", STEP)


def test_no_participation_shortcut_in_the_api():
    import inspect

    from accounting import FederatedPlan

    for callable_ in (PrivacyLedger.record, PrivacyLedger.reserve, FederatedPlan,
                      BudgetGuard.reserve_round):
        names = set(inspect.signature(callable_).parameters)
        assert not any("particip" in n and "prob" in n for n in names)
        assert "client_sampling_rate" not in names


def test_accounting_imports_no_torch():
    code = ("import sys, accounting, accounting.cli, accounting.ledger; "
            "bad = [m for m in ('torch', 'fedsb_dp', 'opacus') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- recorded plan


def _plan(**overrides):
    fields = dict(unit="example", rounds=3, local_steps=10,
                  sampling_probabilities={"a": 0.01, "b": 0.002, "c": 0.0002},
                  noise_multiplier=1.0,
                  clip_norm=1.0, accountant="pld", target_epsilon=3.0, target_delta=1e-6,
                  init_events={"a": PoissonSampledDpEvent(0.064, GaussianDpEvent(8.0))},
                  init={"method": "gradient-svd", "source": "dp"},
                  participation={"rule": "all"})
    return RecordedPlan(**{**fields, **overrides})


def test_plan_round_trips_through_the_saved_ledger(tmp_path):
    path = str(tmp_path / "ledger.json")
    ledger = _ledger(plan=_plan())
    ledger.record("a", STEP, count=10, round_index=0)
    ledger.save(path)
    loaded = PrivacyLedger.load(path)
    assert loaded.plan == _plan()
    assert loaded.metadata["recorded_plan"]["format"] == "fedsb-dp/plan/v1"
    assert json.load(open(path))["schema"] == "fedsb-dp/ledger/v1"  # same container
    # The calibration plan it describes: init + every round × local steps.
    assert loaded.plan.federated_plan().client_event("a", 1.0) == ComposedDpEvent((
        PoissonSampledDpEvent(0.064, GaussianDpEvent(8.0)), SelfComposedDpEvent(STEP, 30)))


def test_ledger_without_a_plan_still_loads(tmp_path):
    path = str(tmp_path / "ledger.json")
    # A node's ledger keeps the server's announced plan under "plan": not a recorded plan.
    _ledger(metadata={"seed_mode": "os-entropy", "plan": {"rounds": 3}}).save(path)
    assert PrivacyLedger.load(path).plan is None


@pytest.mark.parametrize(("plan", "message"), [
    (_plan(unit="client"), "unit 'client' ≠ ledger's 'example'"),
    (_plan(sampling_probabilities={"a": 0.01}, init_events={}), r"keys \['a'\] ≠"),
    (_plan(target_delta=1e-7), "δ 1e-07 ≠ ledger's 1e-06"),
    (_plan(target_epsilon=None), "target ε None ≠ ledger's 3.0"),
])
def test_plan_that_disagrees_with_the_header_is_refused(plan, message):
    with pytest.raises(AccountingError, match=message):
        _ledger(plan=plan)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rounds": -1}, "rounds=-1 must be an integer ≥ 0"),
    ({"sampling_probabilities": {"a": 1.5}}, r"sampling_probabilities\['a'\]=1.5"),
    ({"accountant": "moments"}, "accountant='moments' must be one of"),
    ({"init_events": {"d": NoOpDpEvent()}}, r"init_events name keys \['d'\]"),
    ({"participation": {"rule": "sometimes"}}, "'rule' is one of"),
    ({"participation": {"rule": "seeded-sample", "fraction": 0.5}},
     "clients_per_round=None must be an integer ≥ 1"),
])
def test_bad_plan_values_are_named(overrides, message):
    with pytest.raises(AccountingError, match=message):
        _plan(**overrides)


def test_edited_or_changed_plan_is_refused(tmp_path):
    path = str(tmp_path / "ledger.json")
    _ledger(plan=_plan()).save(path)
    with pytest.raises(LedgerIntegrityError, match="recorded plan changed"):
        _ledger(plan=_plan(noise_multiplier=0.5)).save(path)
    document = json.load(open(path))
    document["body"]["metadata"]["recorded_plan"]["format"] = "fedsb-dp/plan/v0"
    (tmp_path / "edited.json").write_text(json.dumps(document))
    with pytest.raises(LedgerIntegrityError, match="sha256"):
        PrivacyLedger.load(str(tmp_path / "edited.json"))
