"""Torch-free audit: GDP and one-run statistics (pinned references), group privacy, and the
run-directory audit on small synthetic runs (tampering, understated claims, flags)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import special, stats

from accounting import (
    GaussianDpEvent,
    NonPrivateDpEvent,
    PoissonSampledDpEvent,
    PrivacyLedger,
    RecordedPlan,
    federation_epsilon,
)
from accounting.audit import audit_run, audit_sweep, load_run
from accounting.empirical import (
    best_one_run_epsilon,
    fit_gdp,
    gaussian_group_epsilon,
    gdp_delta,
    gdp_epsilon,
    group_privacy,
    guess_counts,
    one_run_epsilon,
    one_run_epsilon_from_scores,
    one_run_p_value,
    roc_frontier,
    top_r_correct,
)
from accounting.errors import AccountingError
from accounting.events import event_from_dict

# ----------------------------------------------------------------------------- GDP


@pytest.mark.parametrize(("sigma", "expected"), [(0.5, 9.997), (1.0, 4.377178), (2.0, 1.993)])
def test_gdp_epsilon_of_one_gaussian_step(sigma, expected):
    assert gdp_epsilon(1 / sigma, 1e-5) == pytest.approx(expected, abs=1e-3)


def test_gdp_delta_matches_reference_closed_form():
    # Closed form (docs/accounting.md): σ=√3, 3 steps ⇒ μ = 1; δ(ε=1) = Φ(−½) − eΦ(−3/2).
    assert gdp_delta(1.0, 1.0) == pytest.approx(0.1269367375, abs=1e-10)
    assert gdp_delta(gdp_epsilon(2.0, 1e-7), 2.0) == pytest.approx(1e-7, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    with pytest.raises(AccountingError, match=r"delta=1\.5 must be in \(0, 1\)"):
        gdp_epsilon(1.0, 1.5)


def test_gdp_fit_recovers_mu_with_a_sound_lower_bound():
    rng = np.random.default_rng(0)
    out = rng.normal(0.0, 2.0, 100_000)
    inn = rng.normal(2.0, 2.0, 100_000)  # μ = 1 in units of the noise
    fit = fit_gdp(inn, out)
    assert fit.mu_hat == pytest.approx(1.0, abs=0.02)
    assert fit.mu_lower < fit.mu_hat and fit.mu_lower < 1.0
    assert 0.95 * 4.377 < fit.epsilon_lower(1e-5) < 4.377
    with pytest.raises(AccountingError, match="zero variance"):
        fit_gdp([1.0, 1.0], [0.0, 0.0])


# ----------------------------------------------------------------------------- one-run audit


def _deterministic_normal(shift: float, n: int) -> np.ndarray:
    return stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + shift


@pytest.mark.parametrize(("shift", "expected"),
                         [(0, 0.0), (1, 1.13346), (2, 2.311945), (4, 4.395568)])
def test_p_value_reproduces_the_frontier_reference_values(shift, expected):
    # jax_privacy's test (docs/privacy.md, "Auditing"): n = 10,000 each, δ = 1e-6, 95 %,
    # Bonferroni over the ROC frontier. That correction is not what the audit uses (the
    # frontier is chosen from the scores), but recomputing it here pins one_run_p_value /
    # one_run_epsilon to the reference.
    inn, out = _deterministic_normal(shift, 10_000), _deterministic_normal(0, 10_000)
    tp, fp = roc_frontier(inn, out)
    eps, _, _ = best_one_run_epsilon(20_000, tp + fp, tp, delta=1e-6, level=0.05 / len(tp))
    assert eps == pytest.approx(expected, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(("shift", "expected", "r", "v"),
                         [(0, 0.0, 0, 0), (1, 2.0516405, 512, 474), (2, 4.1105002, 1024, 1019),
                          (4, 6.1376859, 4096, 4096)])
def test_one_run_bound_on_the_reference_scores(shift, expected, r, v):
    # The same scores with the fixed family r = 1, 2, 4, …, 16384, 20000 (16 tests). Fewer
    # tests than the frontier's 140–386 points, so a higher per-test level: larger bounds.
    bound = one_run_epsilon_from_scores(_deterministic_normal(shift, 10_000),
                                        _deterministic_normal(0, 10_000), delta=1e-6)
    assert bound.epsilon_lower == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert (bound.guesses, bound.correct, bound.thresholds_tested) == (r, v, 16)
    assert bound.epsilon_lower <= bound.ceiling
    assert bound.m == 20_000 and bound.n_in == 10_000


def _family_p_values(bound, inn, out, eps):
    family = guess_counts(bound.m)
    correct = top_r_correct(inn, out, family)
    return np.array([one_run_p_value(bound.m, int(r), int(v), eps, bound.delta)
                     for r, v in zip(family, correct, strict=True)])


@pytest.mark.parametrize("scores", [
    (np.ones(500), np.zeros(500)),  # 3-point frontier: dividing by it would be too optimistic
    (_deterministic_normal(2, 2_000), _deterministic_normal(0, 2_000)),
    (np.arange(300.0), np.arange(300.0) - 150.5),
])
def test_bound_is_the_largest_epsilon_rejected_by_the_fixed_family(scores):
    # The definition, checked from outside: at ε_LB + η no test of the family fixed by m
    # rejects after the Bonferroni factor |family|; at ε_LB − η one does. A correction by a
    # score-dependent count (e.g. the ROC frontier's size) breaks one of the two.
    inn, out = scores
    bound = one_run_epsilon_from_scores(inn, out, delta=1e-5)
    size = len(guess_counts(bound.m))
    assert bound.thresholds_tested == size == int(np.log2(bound.m)) + 2
    assert bound.epsilon_lower > 0.5
    above = _family_p_values(bound, inn, out, bound.epsilon_lower + 1e-6)
    below = _family_p_values(bound, inn, out, bound.epsilon_lower - 1e-6)
    assert above.min() * size >= 0.05
    assert below.min() * size < 0.05


def test_family_does_not_depend_on_the_scores():
    rng = np.random.default_rng(0)
    many = one_run_epsilon_from_scores(rng.normal(1, 1, 512), rng.normal(0, 1, 512), delta=1e-5)
    few = one_run_epsilon_from_scores(np.ones(512), np.zeros(512), delta=1e-5)
    assert len(roc_frontier(np.ones(512), np.zeros(512))[0]) == 3
    assert many.thresholds_tested == few.thresholds_tested == 11  # 1, 2, …, 512, 1024
    assert list(guess_counts(1)) == [1] and list(guess_counts(3)) == [1, 2, 3]


def test_ties_are_counted_against_the_auditor():
    # Scores 2 (in) > 1, 1 (in) = 1 (out) > 0 (out): a guess taken from the tie at 1 is
    # counted as the excluded canary first.
    assert top_r_correct([1, 1, 2], [1, 0], [1, 2, 3, 4, 5]).tolist() == [1, 1, 2, 3, 3]
    with pytest.raises(AccountingError, match=r"guess counts must be in \[1, m=5\]"):
        top_r_correct([1, 1, 2], [1, 0], [0])


def _naive_p_value(m, r, v, eps, delta):
    q = special.expit(eps)
    beta = stats.binom.sf(v - 1, r, q)
    alpha = max((sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i
                 for i in range(1, v + 1)), default=0.0)
    return min(beta + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(("m", "r", "v"), [(10, 10, 10), (100, 40, 31), (1000, 100, 90),
                                           (100, 10, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("delta", [0.0, 1e-6, 1e-2])
def test_one_run_p_value_is_the_snj_formula(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        _naive_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_one_run_bound_is_the_largest_rejected_epsilon():
    eps = one_run_epsilon(1000, 200, 190, delta=1e-5)
    assert one_run_p_value(1000, 200, 190, eps - 1e-6, 1e-5) < 0.05
    assert one_run_p_value(1000, 200, 190, eps + 1e-4, 1e-5) >= 0.05
    assert one_run_epsilon(1000, 200, 100, delta=1e-5) == 0.0  # chance level: nothing
    with pytest.raises(AccountingError, match=r"correct=5 must be in \[0, guesses=4\]"):
        one_run_p_value(10, 4, 5, 1.0, 0.0)


def test_roc_frontier_drops_dominated_thresholds():
    tp, fp = roc_frontier([0, 4, 6, 7], [1, 2, 3, 5])
    frontier = list(zip(fp.tolist(), tp.tolist(), strict=True))
    assert frontier == [(4, 4), (1, 3), (0, 2), (0, 0)]  # (FP, TP) from low to high threshold


def test_ceiling_bounds_a_perfect_attack():
    bound = one_run_epsilon_from_scores(np.ones(500), np.zeros(500), delta=1e-5)
    assert bound.epsilon_lower == pytest.approx(bound.ceiling)
    assert 3.0 < bound.ceiling < 5.0  # a loose alarm, never "the privacy"


# ----------------------------------------------------------------------------- group privacy


def test_group_privacy_standard_bound():
    single = group_privacy(1.0, 1e-6, 1)
    assert (single.epsilon, single.delta) == (1.0, 1e-6)
    group = group_privacy(1.0, 1e-6, 3)
    assert group.epsilon == 3.0
    assert group.delta == pytest.approx(1e-6 * (1 + math.e + math.e ** 2))
    assert group.delta <= 3 * math.exp(2.0) * 1e-6  # the usual k e^{(k−1)ε} δ form
    assert group_privacy(0.0, 1e-6, 4).delta == pytest.approx(4e-6)
    with pytest.raises(AccountingError, match="k=0 must be an integer ≥ 1"):
        group_privacy(1.0, 1e-6, 0)


def test_gaussian_group_privacy_is_k_mu():
    assert gaussian_group_epsilon(0.5, 2, 1e-5).epsilon == pytest.approx(gdp_epsilon(1.0, 1e-5))
    # Tighter than the generic bound at the same δ.
    generic = group_privacy(gdp_epsilon(0.5, 1e-5 / 2 / math.e), 1e-5 / 2 / math.e, 2)
    assert gaussian_group_epsilon(0.5, 2, generic.delta).epsilon < generic.epsilon


# ----------------------------------------------------------------------------- run directories

N, B, SIGMA, ROUNDS, STEPS = 1000, 10, 1.0, 2, 5
P, CLIENT_CLIP = 0.2, 1.0  # client-level runs: cohort rate and update bound


def _write(path, data):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _planned_init_events(init, sizes):
    if init in ("dp", "dp-old", "dp-uncharged"):
        return {cid: PoissonSampledDpEvent(N_INIT / n, GaussianDpEvent(SIGMA_INIT))
                for cid, n in sizes.items()}
    return {}


def make_run(directory, *, clients=2, seed_mode="os-entropy", sampling="poisson",
             allow_large_delta=False, delta=1e-5, extra_steps=None, nonprivate=False,
             claim_scale=1.0, init=None, plan=True, unit="example", step_sigma=SIGMA,
             step_batch=B, skip_init_charge=False):
    """A run directory shaped like the round protocol's, with a real ledger.

    ``plan=True`` records the plan in the ledger as today's runs do (σ = SIGMA, q = B/N,
    STEPS × ROUNDS, the init's events); ``plan=False`` writes a ledger of the code before the
    plan was recorded. ``step_sigma``, ``step_batch``, ``extra_steps`` and
    ``skip_init_charge`` make the charged events disagree with that plan.

    ``init`` adds a gradient-SVD init: ``"dp"`` (today's sampled charge), ``"dp-old"`` (the
    unsampled ``GaussianDpEvent`` charge of the first-n_init init), ``"dp-uncharged"``,
    ``"public"`` (with its data reference) or ``"public-old"`` (no ``init_data``: the old code
    read the clients' records and charged nothing).
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    client_level = unit == "client"
    target = 10.0 if client_level else 3.0  # a handful of clients: a larger ε per client
    sizes = ({"federation": clients} if client_level
             else {f"client-{i}": N for i in range(clients)})
    init_record = INIT_META.get(init, {"method": "w0-svd"})
    recorded = RecordedPlan(
        unit=unit, rounds=ROUNDS, local_steps=1 if client_level else STEPS,
        sampling_probabilities={k: P if client_level else B / n for k, n in sizes.items()},
        noise_multiplier=SIGMA, clip_norm=CLIENT_CLIP if client_level else 0.1,
        accountant="prv", target_epsilon=target, target_delta=delta,
        init_events=_planned_init_events(init, sizes), init=init_record,
        participation={"rule": "poisson-cohort", "probability": P} if client_level
        else {"rule": "all"}) if plan else None
    ledger = PrivacyLedger(
        unit=unit, dataset_sizes=sizes, target_epsilon=target, target_delta=delta,
        allow_large_delta=allow_large_delta,
        metadata={"seed_mode": seed_mode, "noise_is_release": seed_mode != "seeded",
                  "sampling": sampling, "noise_multiplier": SIGMA, "max_grad_norm": 0.1,
                  "dp_level": unit,
                  **({"client_clip_norm": CLIENT_CLIP} if client_level else {}),
                  **({"init": INIT_META[init]} if init in INIT_META else {})},
        plan=recorded)
    for cid in sizes:
        if init == "dp" and not skip_init_charge:
            ledger.record(cid, PoissonSampledDpEvent(N_INIT / N, GaussianDpEvent(SIGMA_INIT)),
                          kind="init")
        elif init == "dp-old":
            ledger.record(cid, GaussianDpEvent(SIGMA_INIT), kind="init")
    if client_level:
        step, count = PoissonSampledDpEvent(P, GaussianDpEvent(step_sigma)), 1
    else:
        step, count = PoissonSampledDpEvent(step_batch / N, GaussianDpEvent(step_sigma)), STEPS
    for r in range(ROUNDS):
        for cid in sizes:
            ledger.record(cid, step, count=count, round_index=r)
    if nonprivate:
        ledger.record("client-0", NonPrivateDpEvent(), kind="init")
    for cid, extra in (extra_steps or {}).items():
        ledger.record(cid, step, count=extra, round_index=ROUNDS)
    ledger.save(os.path.join(directory, "ledger.json"))
    settings = {"epsilon": target, "delta": delta, "dp_level": unit, "max_grad_norm": 0.1,
                "client_clip_norm": CLIENT_CLIP, "batch_size": B, "rounds": ROUNDS,
                "local_steps": STEPS, "participation": P if client_level else 1.0,
                "clients": clients, "seed": 1 if seed_mode == "seeded" else None,
                "out": directory, **INIT_SETTINGS.get(init, {})}
    # Any stable digest: the audit only checks that provenance names the one config.json keeps.
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    _write(os.path.join(directory, "config.json"), {"config": settings, "digest": digest})
    _write(os.path.join(directory, "provenance.json"), {
        "config_digest": digest, "versions": {"opacus": "1.6.0"},
        "seed_mode": "seeded: not a private release" if seed_mode == "seeded" else
        "os-entropy: DP noise drawn from OS entropy"})
    result = federation_epsilon(PrivacyLedger.load(os.path.join(directory, "ledger.json")))
    _write(os.path.join(directory, "summary.json"), {
        "seed_mode": seed_mode, "status": "completed",
        "privacy": {"epsilon": result.epsilon * claim_scale, "accountant": "prv",
                    "delta": delta,
                    "per_client_epsilon": {c: r.epsilon * claim_scale
                                           for c, r in result.per_client.items()}}})
    _write(os.path.join(directory, "progress.json"), {"noise_multiplier": SIGMA,
                                                      "completed_rounds": ROUNDS})
    with open(os.path.join(directory, "metrics.jsonl"), "w") as fh:
        for r in range(ROUNDS):
            # Client-level runs publish no cohort.
            line = {"round": r + 1} if client_level else {"round": r + 1,
                                                           "participants": list(sizes)}
            fh.write(json.dumps(line) + "\n")
    return directory


N_INIT, SIGMA_INIT = 64, 8.0
_DP_INIT = {"init": "gradient-svd", "init_source": "dp", "init_examples": N_INIT,
            "init_noise_multiplier": SIGMA_INIT, "init_clip_norm": 1.0}
_PUBLIC_INIT = {"init": "gradient-svd", "init_source": "public", "init_examples": N_INIT}
INIT_SETTINGS = {
    "dp": _DP_INIT, "dp-old": _DP_INIT, "dp-uncharged": _DP_INIT,
    "public": {**_PUBLIC_INIT, "init_data": "public.csv"}, "public-old": _PUBLIC_INIT,
}
_DP_META = {"method": "gradient-svd", "source": "dp", "examples": N_INIT,
            "noise_multiplier": SIGMA_INIT, "clip_norm": 1.0, "sampling": "poisson"}
INIT_META = {
    "dp": _DP_META, "dp-old": _DP_META, "dp-uncharged": _DP_META,
    "public": {"method": "gradient-svd", "source": "public", "examples": N_INIT,
               "data": {"source": "public.csv", "records": N_INIT, "records_sha256": "ab" * 32,
                        "file_sha256": "cd" * 32}},
    "public-old": {"method": "gradient-svd", "source": "public", "examples": N_INIT},
}


def _check(report, name):
    return next(c for c in report.checks if c[0] == name)


def test_clean_run_passes_with_invariants(tmp_path):
    report = audit_run(make_run(tmp_path / "run"))
    assert report.passed, report.format()
    assert "PASS" in report.verdict
    table = report.epsilons
    assert list(table["client"]) == ["client-0", "client-1"]
    assert (table["steps"] == ROUNDS * STEPS).all()
    row = table.iloc[0]
    assert row["prv_lower"] <= row["pld"] * (1 + 1e-3)
    assert row["pld"] <= row["prv_upper"] * (1 + 1e-3) and row["prv_upper"] <= row["rdp"]
    assert report.federation["prv_upper"] == pytest.approx(row["prv_upper"])
    assert "audit of" in report.format()


def test_tampered_ledger_is_rejected(tmp_path):
    path = make_run(tmp_path / "run")
    ledger_file = os.path.join(path, "ledger.json")
    document = json.load(open(ledger_file))
    document["body"]["entries"][0]["count"] -= 4  # fewer steps charged, hash left as it was
    _write(ledger_file, document)
    report = audit_run(path)
    assert not report.passed
    name, ok, detail = _check(report, "ledger integrity")
    assert not ok and "sha256" in detail
    assert load_run(path).ledger is None


def test_understated_claim_is_flagged(tmp_path):
    report = audit_run(make_run(tmp_path / "run", claim_scale=0.9))
    _, ok, detail = _check(report, "claim matches recomputation")
    assert not ok and "UNDERSTATES" in detail
    assert not report.passed and "claim matches recomputation" in report.verdict


def test_nonprivate_release_is_flagged(tmp_path):
    report = audit_run(make_run(tmp_path / "run", nonprivate=True))
    _, ok, detail = _check(report, "private releases only")
    assert not ok and "client-0" in detail
    assert math.isinf(report.epsilons.set_index("client").loc["client-0", "pld"])
    assert not report.passed


def test_large_delta_is_flagged(tmp_path):
    report = audit_run(make_run(tmp_path / "run", delta=1e-3, allow_large_delta=True))
    _, ok, detail = _check(report, "delta < 1/N")
    assert not ok and "override" in detail


def test_seeded_run_is_flagged_as_not_a_release(tmp_path):
    report = audit_run(make_run(tmp_path / "run", seed_mode="seeded"))
    _, ok, detail = _check(report, "noise is a private release")
    assert not ok and "SEEDED" in detail
    assert _check(report, "provenance")[1]  # consistently marked: only the flag fails


def test_non_poisson_sampling_is_flagged(tmp_path):
    report = audit_run(make_run(tmp_path / "run", sampling="shuffle"))
    assert not _check(report, "Poisson sampling")[1]


def test_client_with_unplanned_steps_is_flagged(tmp_path):
    report = audit_run(make_run(tmp_path / "run", extra_steps={"client-1": 3}))
    _, ok, detail = _check(report, "steps match the plan")
    assert not ok and "client-1 13≠10" in detail


def test_audit_reads_the_plan_not_the_settings(tmp_path):
    path = make_run(tmp_path / "run")
    config = json.load(open(os.path.join(path, "config.json")))
    config["config"]["max_grad_norm"] = 1.0  # the plan in the ledger is what counts
    config["config"]["batch_size"] = 99
    _write(os.path.join(path, "config.json"), config)
    assert audit_run(path).passed
    config["digest"] = "0" * 64  # now config.json no longer names the run's settings
    _write(os.path.join(path, "config.json"), config)
    _, ok, detail = _check(audit_run(path), "config")
    assert not ok and "digest" in detail and "provenance" in detail


def test_edited_settings_of_an_old_run_are_flagged(tmp_path):
    path = make_run(tmp_path / "run", plan=False)
    config = json.load(open(os.path.join(path, "config.json")))
    config["config"]["max_grad_norm"] = 1.0  # the ledger's metadata says 0.1
    _write(os.path.join(path, "config.json"), config)
    _, ok, detail = _check(audit_run(path), "plan matches the ledger metadata")
    assert not ok and "clip norm 1.0 ≠ ledger's 0.1" in detail


# ----------------------------------------------------------------------------- recorded plan


@pytest.mark.parametrize("unit", ["example", "client"])
def test_run_with_a_recorded_plan_passes(tmp_path, unit):
    report = audit_run(make_run(tmp_path / "run", unit=unit, init="dp" if unit == "example"
                                else None))
    assert report.passed, report.format()
    _, ok, detail = _check(report, "recorded plan")
    assert ok and "fedsb-dp/plan/v1" in detail and "predates" not in report.verdict
    assert f"DP per {'client' if unit == 'client' else 'record'}" in report.verdict
    assert "step events match the plan" in [c[0] for c in report.checks]


@pytest.mark.parametrize(("unit", "bad", "check", "expected"), [
    ("example", {"step_sigma": 0.9}, "step events match the plan", "σ 0.9 ≠ plan σ 1"),
    ("client", {"step_sigma": 0.9}, "step events match the plan", "σ 0.9 ≠ plan σ 1"),
    ("example", {"step_batch": 12}, "step events match the plan", "q 0.012 ≠ plan q 0.01"),
    ("example", {"extra_steps": {"client-1": 1}}, "steps match the plan", "client-1 11≠10"),
    ("client", {"extra_steps": {"federation": 1}}, "steps match the plan", "federation 3≠2"),
    ("example", {"init": "dp", "skip_init_charge": True}, "init matches the ledger",
     "the ledger has no init charge"),
    ("example", {"init": "dp-old"}, "init matches the ledger", "OLD unsampled charge"),
])
def test_events_that_disagree_with_the_recorded_plan_fail(tmp_path, unit, bad, check,
                                                          expected):
    """A writer whose releases are not its plan: only the matching check fails."""
    report = audit_run(make_run(tmp_path / "run", unit=unit, **bad))
    _, ok, detail = _check(report, check)
    assert not ok and expected in detail, detail
    assert [c[0] for c in report.failures] == [check], report.format()


def test_plan_whose_init_events_are_not_its_init_record_fails(tmp_path):
    path = make_run(tmp_path / "run")
    ledger = PrivacyLedger.load(os.path.join(path, "ledger.json"))
    body = ledger.to_json_dict()["body"]
    metadata = body["metadata"]
    metadata["recorded_plan"]["init"] = INIT_META["dp"]  # a DP init the plan charges nobody
    rewritten = PrivacyLedger(unit="example", dataset_sizes=body["dataset_sizes"],
                              target_epsilon=3.0, target_delta=1e-5, metadata=metadata)
    for entry in body["entries"]:
        rewritten.record(entry["client"], event_from_dict(entry["event"]),
                         count=entry["count"], round_index=entry["rounds"][0])
    os.remove(os.path.join(path, "ledger.json"))
    rewritten.save(os.path.join(path, "ledger.json"))
    _, ok, detail = _check(audit_run(path), "init matches the ledger")
    assert not ok and "planned as no init charge; expected PoissonSampled(q=0.064" in detail


def test_old_run_without_a_plan_audits_from_its_settings_with_a_note(tmp_path):
    report = audit_run(make_run(tmp_path / "run", plan=False))
    assert report.passed, report.format()
    _, ok, detail = _check(report, "recorded plan")
    assert ok and "predates the recorded plan" in detail
    assert "Note: the ledger predates the recorded plan" in report.verdict
    # The stand-in is still held to the ledger's events.
    report = audit_run(make_run(tmp_path / "bad", plan=False, step_sigma=0.9))
    assert [c[0] for c in report.failures] == ["step events match the plan"]


def test_old_run_without_a_plan_or_settings_fails_clearly(tmp_path):
    path = make_run(tmp_path / "run", plan=False)
    _write(os.path.join(path, "config.json"), {"digest": json.load(
        open(os.path.join(path, "config.json")))["digest"]})
    report = audit_run(path)
    _, ok, detail = _check(report, "recorded plan")
    assert not ok and "predates the recorded plan" in detail and "no settings" in detail
    assert [c[0] for c in report.failures] == ["recorded plan"]


def test_sweep_audits_every_run(tmp_path):
    make_run(tmp_path / "sweep" / "a")
    make_run(tmp_path / "sweep" / "b", seed_mode="seeded")
    report = audit_sweep(str(tmp_path / "sweep"))
    assert not report.passed
    assert {"a", "b"} == set(report.epsilons["run"])
    assert [c[0] for c in report.failures] == ["b/noise is a private release"]
    with pytest.raises(AccountingError, match="neither a run directory"):
        audit_sweep(str(tmp_path))


def test_audit_modules_stay_torch_free():
    code = ("import sys, accounting.audit, accounting.empirical; "
            "bad = [m for m in ('torch', 'fedsb_dp', 'opacus') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("init", [None, "dp", "public"])
def test_init_that_matches_its_charge_passes(tmp_path, init):
    report = audit_run(make_run(tmp_path / "run", init=init))
    assert report.passed, report.format()
    _, ok, detail = _check(report, "init matches the ledger")
    assert ok and (init != "dp" or "PoissonSampled(q = 64/N_i" in detail)


@pytest.mark.parametrize(("init", "expected"), [
    ("dp-old", "OLD unsampled charge"),
    ("dp-uncharged", "no init charge"),
    ("public-old", "without an --init-data reference"),
])
@pytest.mark.parametrize("plan", [True, False])
def test_old_init_shapes_fail_the_audit(tmp_path, init, expected, plan):
    """Run directories as the pre-fix code wrote them: every other check passes."""
    report = audit_run(make_run(tmp_path / "run", init=init, plan=plan))
    _, ok, detail = _check(report, "init matches the ledger")
    assert not ok and expected in detail, detail
    assert [c[0] for c in report.failures] == ["init matches the ledger"]
    assert "init matches the ledger" in report.verdict


def test_dp_init_charged_at_another_rate_fails(tmp_path):
    path = make_run(tmp_path / "run", init="dp", plan=False)
    config = json.load(open(os.path.join(path, "config.json")))
    config["config"]["init_examples"] = 32  # the ledger charges q = 64/N
    _write(os.path.join(path, "config.json"), config)
    _, ok, detail = _check(audit_run(path), "init matches the ledger")
    assert not ok and "the plan charges 1× PoissonSampled(q=0.032" in detail
