"""Accountants against the reference values of docs/accounting.md, cross-accountant invariants,
monotonicity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from accounting import (
    GaussianDpEvent,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
    compute_delta,
    compute_epsilon,
)
from accounting.accountants import OPACUS_RDP_ORDERS, _atoms, _rdp_accountant
from accounting.errors import AccountingError
from conftest import count_calls


def sgm(sigma: float, q: float, steps: int):
    return SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)


def test_exact_gaussian_delta_is_bracketed_by_prv():
    event = SelfComposedDpEvent(GaussianDpEvent(math.sqrt(3)), 3)
    exact = norm.cdf(-0.5) - math.e * norm.cdf(-1.5)
    assert exact == pytest.approx(0.1269367375, abs=1e-10)
    lower, estimate, upper = compute_delta(event, epsilon=1.0)
    assert lower <= exact <= upper
    assert estimate == pytest.approx(exact, abs=1e-6)
    pld = compute_delta(event, epsilon=1.0, accountant="pld")[0]
    assert pld == pytest.approx(exact, abs=1e-6)


def test_exact_gaussian_epsilon():
    event = SelfComposedDpEvent(GaussianDpEvent(math.sqrt(3)), 3)
    prv = compute_epsilon(event, delta=1e-5)
    assert prv.lower <= 4.377178 <= prv.epsilon
    assert prv.estimate == pytest.approx(4.377178, abs=1e-3)
    assert compute_epsilon(event, delta=1e-5, accountant="pld").epsilon == pytest.approx(
        4.377178, abs=1e-3)


def test_subsampled_delta_row():
    assert compute_delta(sgm(0.5, 0.2, 3), epsilon=1.0, accountant="pld")[1] == pytest.approx(
        0.15594, abs=1e-3)
    lower, _, upper = compute_delta(sgm(0.5, 0.2, 3), epsilon=1.0)
    assert lower - 1e-3 <= 0.15594 <= upper + 1e-3


def test_opacus_comparison_row():
    event = sgm(1.5, 0.04, 2250)
    rdp = compute_epsilon(event, delta=1e-5, accountant="rdp", rdp_orders=OPACUS_RDP_ORDERS)
    assert rdp.epsilon == pytest.approx(7.32911, abs=1e-3)
    prv = compute_epsilon(event, delta=1e-5)
    assert prv.epsilon <= 6.7791 + 1e-4
    pld = compute_epsilon(event, delta=1e-5, accountant="pld")
    assert pld.epsilon == pytest.approx(6.7688, abs=1e-3)
    assert prv.lower <= pld.epsilon <= prv.epsilon <= rdp.epsilon
    assert abs(prv.estimate - pld.epsilon) <= 1e-3


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "expected"),
    [(0.8, 0.001, 100, 0.27040), (1.5, 0.05, 1000, 6.20997), (2.0, 0.001, 20000, 0.30584),
     (3.0, 0.2, 100, 3.38122)],
)
def test_prv_upper_rows(sigma, q, steps, expected):
    result = compute_epsilon(sgm(sigma, q, steps), delta=1e-6, eps_error=0.01)
    assert result.accountant == "prv" and result.fallback_reason is None
    assert result.epsilon == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta", "rdp", "pld"),
    [(1.3, 0.0025, 6000, 1e-5, 0.72422, 0.6401), (1.0, 0.001, 30000, 1e-7, 1.41550, 1.0982),
     (1.0, 0.05, 500, 1e-5, 8.302, 7.524)],
)
def test_rdp_and_pld_rows(sigma, q, steps, delta, rdp, pld):
    event = sgm(sigma, q, steps)
    assert compute_epsilon(event, delta=delta, accountant="rdp").epsilon == pytest.approx(
        rdp, abs=1e-3)
    assert compute_epsilon(event, delta=delta, accountant="pld").epsilon == pytest.approx(
        pld, abs=1e-3)


def test_classic_rdp_conversion_row():
    event = sgm(1.1, 256 / 60000, 14063)
    orders = np.array(OPACUS_RDP_ORDERS)
    rdp = _rdp_accountant(_atoms(event)[0], OPACUS_RDP_ORDERS)._rdp
    classic = np.nanmin(rdp + math.log(1 / 1e-5) / (orders - 1))
    assert classic == pytest.approx(3.008, abs=1e-3)
    assert compute_epsilon(event, delta=1e-5, accountant="pld").epsilon == pytest.approx(
        2.382, abs=1e-3)


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(0.1, 0.632, 100), (0.2, 1.0, 10), (0.125, 0.8, 1000)])
def test_prv_failures_fall_back_to_pld_and_say_so(q, sigma, steps):
    kwargs = {"eps_error": 0.1, "delta_error": 1e-10} if (q, steps) == (0.125, 1000) else {}
    if (q, steps) == (0.2, 10):
        kwargs = {"delta_error": 1e-10}
    result = compute_epsilon(sgm(sigma, q, steps), delta=1e-5, **kwargs)
    pld = compute_epsilon(sgm(sigma, q, steps), delta=1e-5, accountant="pld")
    if result.accountant == "pld":
        assert "fell back to the PLD accountant" in result.fallback_reason
        assert result.requested_accountant == "prv"
        assert result.epsilon == pld.epsilon
    else:  # this input no longer fails: then the PRV bracket must hold PLD
        assert result.lower <= pld.epsilon + 1e-3 and pld.epsilon <= result.epsilon + 1e-3


def test_first_failure_row_does_fail_in_prv_0_2_0():
    result = compute_epsilon(sgm(0.632, 0.1, 100), delta=1e-5)
    assert result.accountant == "pld"
    assert "Discrete mean differs" in result.fallback_reason


# The grid stays at ε ≲ 10, the regime anyone deploys. At ε ≈ 19 (σ = 0.8, q = 0.1, T = 300)
# prv-accountant 0.2.0's *lower* bound sits 0.007 above dp_accounting's pessimistic PLD value,
# so one of the two is off far in the tail; that is tracked as its own issue.
@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("q", [0.01, 0.1])
@pytest.mark.parametrize("steps", [10, 300])
def test_cross_accountant_invariants(sigma, q, steps):
    event = sgm(sigma, q, steps)
    delta = 1e-5
    prv = compute_epsilon(event, delta=delta)
    pld = compute_epsilon(event, delta=delta, accountant="pld").epsilon
    rdp = compute_epsilon(event, delta=delta, accountant="rdp").epsilon
    if prv.accountant != "prv":
        pytest.skip(prv.fallback_reason)
    # Slack 1e-3: PLD's pessimistic discretisation (1e-4 grid) and PRV's own mesh.
    assert prv.lower - 1e-3 <= pld <= prv.epsilon + 1e-3
    assert prv.epsilon <= rdp + 1e-3
    assert abs(prv.estimate - pld) <= 1e-3 + 2e-4 * pld  # PLD grid error grows with ε


def test_non_private_and_noop():
    non_private = compute_epsilon(NonPrivateDpEvent(), delta=1e-5)
    assert math.isinf(non_private.epsilon) and non_private.non_private
    zero_noise = sgm(0.0, 0.1, 3)
    assert math.isinf(compute_epsilon(zero_noise, delta=1e-5).epsilon)
    assert compute_epsilon(NoOpDpEvent(), delta=1e-5).epsilon == 0.0
    assert compute_epsilon(sgm(1.0, 0.0, 10), delta=1e-5).epsilon == 0.0


def test_self_composition_nesting_is_associative():
    step = PoissonSampledDpEvent(0.02, GaussianDpEvent(1.0))
    flat = compute_epsilon(SelfComposedDpEvent(step, 6 * 50), delta=1e-5).epsilon
    nested = compute_epsilon(SelfComposedDpEvent(SelfComposedDpEvent(step, 6), 50),
                             delta=1e-5).epsilon
    assert flat == nested


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_bad_delta(delta):
    with pytest.raises(AccountingError, match=f"delta={delta}"):
        compute_epsilon(sgm(1.0, 0.1, 1), delta=delta)


def test_bad_accountant():
    with pytest.raises(AccountingError, match="accountant='moments'"):
        compute_epsilon(sgm(1.0, 0.1, 1), delta=1e-5, accountant="moments")


@settings(max_examples=6, deadline=None)
@given(sigma=st.floats(0.6, 3.0), factor=st.floats(1.1, 2.0))
def test_epsilon_falls_with_sigma(sigma, factor):
    low = compute_epsilon(sgm(sigma * factor, 0.05, 100), delta=1e-5, accountant="pld").epsilon
    high = compute_epsilon(sgm(sigma, 0.05, 100), delta=1e-5, accountant="pld").epsilon
    assert low <= high


@settings(max_examples=6, deadline=None)
@given(q=st.floats(0.001, 0.5), factor=st.floats(1.1, 2.0))
def test_epsilon_rises_with_q(q, factor):
    small = compute_epsilon(sgm(1.0, q, 50), delta=1e-5, accountant="pld").epsilon
    large = compute_epsilon(sgm(1.0, min(1.0, q * factor), 50), delta=1e-5,
                            accountant="pld").epsilon
    assert small <= large + 1e-9


@settings(max_examples=6, deadline=None)
@given(steps=st.integers(1, 2000), extra=st.integers(1, 2000))
def test_epsilon_rises_with_steps(steps, extra):
    fewer = compute_epsilon(sgm(1.0, 0.02, steps), delta=1e-5).epsilon
    more = compute_epsilon(sgm(1.0, 0.02, steps + extra), delta=1e-5).epsilon
    assert fewer <= more + 1e-9


def test_memoised_answers_depend_on_every_part_of_the_query(monkeypatch):
    """The per-process memo may skip arithmetic, never change an answer: a repeat is served
    from it, and a query differing in δ, accountant, ε error or history is not."""
    from accounting import accountants

    accountants.clear_epsilon_cache()
    calls = count_calls(monkeypatch, accountants, "_compute_epsilon")
    event = sgm(1.1, 0.05, 40)
    first = compute_epsilon(event, delta=1e-5)
    assert compute_epsilon(event, delta=1e-5) is first
    assert [call["accountant"] for call in calls] == ["prv"]
    fresh = {
        "delta": compute_epsilon(event, delta=1e-6).epsilon,
        "accountant": compute_epsilon(event, delta=1e-5, accountant="rdp").epsilon,
        "history": compute_epsilon(sgm(1.1, 0.05, 41), delta=1e-5).epsilon,
    }
    compute_epsilon(event, delta=1e-5, eps_error=0.02)
    assert len(calls) == 5
    assert fresh["delta"] > first.epsilon and fresh["accountant"] > first.epsilon
    assert fresh["history"] > first.epsilon
    accountants.clear_epsilon_cache()
    assert compute_epsilon(event, delta=1e-5).epsilon == first.epsilon and len(calls) == 6
