"""Choosing σ for a whole planned run, and the inverse questions.

σ is calibrated once for everything the run will release (an optional init event plus every
round × local steps at each client's own sampling rate), so that the max-over-clients ε meets
the target. Calibrating per round would spend the whole target every round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from accounting import calibration_cache
from accounting.accountants import (
    EpsilonResult,
    FederationResult,
    _check_accountant,
    federation_epsilon_of,
)
from accounting.errors import AccountingError
from accounting.events import (
    ComposedDpEvent,
    DpEvent,
    SelfComposedDpEvent,
    sampled_gaussian_event,
)

SIGMA_MAX = 1e4


@dataclass(frozen=True)
class FederatedPlan:
    """What each client will release in a run, before σ is known.

    Attributes:
        sampling_probabilities: Client id → q_i = expected batch / N_i, in (0, 1].
        local_steps: DP-SGD steps per round, one number or per client.
        rounds: Planned rounds.
        participation: Client id → the round indices it will join (default: all rounds).
            Only explicit rounds: there is no participation probability.
        init_events: Client id → an already-fixed init release charged on top.
    """

    sampling_probabilities: dict[str, float]
    local_steps: dict[str, int] | int
    rounds: int
    participation: dict[str, list[int]] | None = None
    init_events: dict[str, DpEvent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sampling_probabilities:
            raise AccountingError("the plan must name at least one client")
        for cid, q in self.sampling_probabilities.items():
            if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
                raise AccountingError(f"sampling probability of {cid!r} = {q!r} must be in (0, 1]")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise AccountingError(f"rounds={self.rounds!r} must be a non-negative integer")
        for cid in self.sampling_probabilities:
            steps = self.steps_per_round(cid)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise AccountingError(f"local_steps of {cid!r} = {steps!r} must be an int ≥ 0")
        unknown = set(self.init_events) - set(self.sampling_probabilities)
        if unknown:
            raise AccountingError(f"init_events name unknown clients {sorted(unknown)}")

    def steps_per_round(self, client_id: str) -> int:
        """K_i."""
        if isinstance(self.local_steps, dict):
            return self.local_steps.get(client_id, 0)
        return self.local_steps

    def rounds_joined(self, client_id: str) -> int:
        """How many rounds the client takes part in."""
        if self.participation is None or client_id not in self.participation:
            return self.rounds
        return sum(1 for r in set(self.participation[client_id]) if 0 <= r < self.rounds)

    def client_event(self, client_id: str, noise_multiplier: float, *,
                     rounds: int | None = None) -> DpEvent:
        """Everything the plan releases about ``client_id`` at noise ``noise_multiplier``."""
        joined = self.rounds_joined(client_id) if rounds is None else rounds
        step = sampled_gaussian_event(
            sampling_probability=self.sampling_probabilities[client_id],
            noise_multiplier=noise_multiplier)
        parts: list[DpEvent] = []
        if client_id in self.init_events:
            parts.append(self.init_events[client_id])
        parts.append(SelfComposedDpEvent(step, self.steps_per_round(client_id) * joined))
        return ComposedDpEvent(tuple(parts))


@dataclass(frozen=True)
class CalibrationResult:
    """σ for a plan and what it achieves.

    Attributes:
        noise_multiplier: The smallest σ found whose ε ≤ target.
        achieved_epsilon: max over clients of ε at that σ (≤ target).
        accountant: Accountant that judged the target (after any fallback).
        per_client: Client id → ε result at σ.
    """

    noise_multiplier: float
    achieved_epsilon: float
    accountant: str
    per_client: dict[str, EpsilonResult]


def _check_targets(target_epsilon: float, target_delta: float) -> None:
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float) or not (
        0 < target_epsilon < math.inf
    ):
        raise AccountingError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    if not 0 < target_delta < 1:
        raise AccountingError(f"target_delta={target_delta!r} must be in (0, 1)")


def calibrate(
    epsilon_of: Callable[[float], float],
    *,
    target_epsilon: float,
    tolerance: float = 1e-3,
    sigma_start: float = 1.0,
    step: float = 2.0,
) -> float:
    """Smallest σ (to ``tolerance`` relative) with ``epsilon_of(σ) ≤ target``; never above.

    ``epsilon_of`` must be non-increasing in σ. The bracket grows by factors of ``step`` from
    ``sigma_start`` (up or down), then Brent's method closes it on log σ; the returned σ is
    always one at which ``epsilon_of`` was evaluated and met the target.

    Raises:
        AccountingError: If even σ = 10⁴ does not reach the target.
    """
    if epsilon_of(sigma_start) <= target_epsilon:
        high, low = sigma_start, sigma_start / step
        while epsilon_of(low) <= target_epsilon:
            high, low = low, low / step
            if low < 1e-4:
                return high
    else:
        low, high = sigma_start, sigma_start * step
        while epsilon_of(high) > target_epsilon:
            if high >= SIGMA_MAX:
                raise AccountingError(
                    f"target ε = {target_epsilon} is unreachable: even σ = {SIGMA_MAX:g} exceeds "
                    "it. Raise the target, or reduce what the plan releases (fewer rounds or "
                    "local steps, smaller sampling rate, a cheaper or data-free initialisation)")
            low, high = high, high * step
    # Brent's method on log σ finds the crossing in a handful of evaluations; the answer is
    # then nudged up until it provably meets the target, so it can never be above it.
    from scipy.optimize import brentq

    def gap(log_sigma: float) -> float:
        return epsilon_of(math.exp(log_sigma)) - target_epsilon

    if high / low > 1 + tolerance:
        root = brentq(gap, math.log(low), math.log(high), xtol=tolerance / 4)
        sigma = min(math.exp(root), high)
        while epsilon_of(sigma) > target_epsilon:
            sigma = min(sigma * (1 + tolerance / 4), high)
        return sigma
    return high


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    plan: FederatedPlan,
    accountant: str = "prv",
    tolerance: float = 1e-3,
    cache_dir: str | None = None,
) -> CalibrationResult:
    """σ for the whole plan so that max-over-clients ε ≤ target (never above).

    Args:
        target_epsilon: ε every client must meet.
        target_delta: δ.
        plan: What each client releases, σ aside.
        accountant: The accountant that judges the target (``prv``, ``pld`` or ``rdp``).
        tolerance: Relative tolerance on σ.
        cache_dir: A directory of earlier answers (default: ``$FEDSB_DP_CALIBRATION_CACHE``,
            else none); an answer found there is used only after ε is recomputed at its σ
            and meets the target (:mod:`accounting.calibration_cache`).

    Raises:
        AccountingError: Bad targets; the init events alone already exceed the target; or the
            target is unreachable at any σ.
    """
    _check_targets(target_epsilon, target_delta)
    _check_accountant(accountant)
    clients = list(plan.sampling_probabilities)
    if plan.init_events:
        init_only = federation_epsilon_of(dict(plan.init_events), delta=target_delta,
                                          accountant=accountant)
        if init_only.epsilon >= target_epsilon:
            raise AccountingError(
                f"the initialisation alone costs ε = {init_only.epsilon:.4g} ≥ target "
                f"{target_epsilon} (client {init_only.worst_client!r}); raise the init noise "
                "multiplier or use a data-free/public initialisation")

    def federation(sigma: float) -> FederationResult:
        return federation_epsilon_of({cid: plan.client_event(cid, sigma) for cid in clients},
                                     delta=target_delta, accountant=accountant)

    directory = calibration_cache.cache_directory(cache_dir)
    if directory is None:
        return _search(plan, clients, target_epsilon=target_epsilon, target_delta=target_delta,
                       accountant=accountant, tolerance=tolerance)
    histories = [repr((plan.sampling_probabilities[cid],
                       plan.steps_per_round(cid) * plan.rounds_joined(cid),
                       plan.init_events.get(cid))) for cid in clients]
    key = calibration_cache.cache_key(histories, kind="shared", target_epsilon=target_epsilon,
                                      target_delta=target_delta, accountant=accountant,
                                      tolerance=tolerance)
    found = calibration_cache.lookup(directory, key, target_epsilon=target_epsilon,
                                     verify=federation)
    if found is not None:
        sigma, result = found
        return CalibrationResult(sigma, result.epsilon,
                                 result.per_client[result.worst_client].accountant,
                                 result.per_client)
    fresh = _search(plan, clients, target_epsilon=target_epsilon, target_delta=target_delta,
                    accountant=accountant, tolerance=tolerance)
    calibration_cache.store(directory, key, fresh.noise_multiplier, description={
        "target_epsilon": target_epsilon, "target_delta": target_delta,
        "accountant": accountant, "histories": sorted(set(histories)),
        "achieved_epsilon": fresh.achieved_epsilon})
    return fresh


def _search(plan: FederatedPlan, clients: list[str], *, target_epsilon: float,
            target_delta: float, accountant: str, tolerance: float) -> CalibrationResult:
    """The calibration itself (see :func:`calibrate_noise_multiplier`)."""

    def worst(sigma: float, name: str = accountant) -> float:
        return federation_epsilon_of(
            {cid: plan.client_event(cid, sigma) for cid in clients},
            delta=target_delta, accountant=name).epsilon

    start = 1.0
    if accountant != "rdp":
        # RDP is fast and never below PRV/PLD, so its σ is a safe upper start: the precise
        # accountant is then only asked about moderate ε, where it is fast too.
        start = calibrate(lambda s: worst(s, "rdp"), target_epsilon=target_epsilon,
                          tolerance=1e-2)
    # PRV queries get slow for long histories (its grid shrinks like 1/√steps); PLD agrees
    # with PRV's estimate to ~1e-3, so it locates σ and PRV's upper bound then judges it.
    search = "pld" if accountant == "prv" else accountant
    sigma = calibrate(lambda s: worst(s, search), target_epsilon=target_epsilon,
                      tolerance=tolerance, sigma_start=start,
                      step=1.25 if accountant != "rdp" else 2.0)
    result = federation_epsilon_of({cid: plan.client_event(cid, sigma) for cid in clients},
                                   delta=target_delta, accountant=accountant)
    failing = None
    while result.epsilon > target_epsilon:
        failing = sigma
        # ε falls roughly in proportion to σ here, so the relative excess is the step needed.
        sigma *= 1 + 1.1 * (result.epsilon - target_epsilon) / target_epsilon + tolerance / 4
        result = federation_epsilon_of({cid: plan.client_event(cid, sigma) for cid in clients},
                                       delta=target_delta, accountant=accountant)
    if failing is not None and sigma / failing > 1 + tolerance:
        # Close the remaining gap with the judging accountant itself (never above target).
        refined = calibrate(worst, target_epsilon=target_epsilon, tolerance=tolerance,
                            sigma_start=sigma, step=sigma / failing)
        if refined < sigma:
            sigma = refined
            result = federation_epsilon_of(
                {cid: plan.client_event(cid, sigma) for cid in clients},
                delta=target_delta, accountant=accountant)
    if result.epsilon > target_epsilon:  # calibrate() guarantees this cannot happen
        raise AccountingError(f"calibration overshot: ε = {result.epsilon} > {target_epsilon}")
    used = result.per_client[result.worst_client].accountant
    return CalibrationResult(sigma, result.epsilon, used, result.per_client)


def calibrate_per_client(
    *,
    target_epsilon: float,
    target_delta: float,
    plan: FederatedPlan,
    accountant: str = "prv",
    tolerance: float = 1e-3,
    cache_dir: str | None = None,
) -> dict[str, CalibrationResult]:
    """σᵢ for each client of the plan on its own, so that every client's ε ≤ target.

    Each client's releases compose only with its own (parallel composition over disjoint
    datasets), so its σᵢ is the smallest σ at which *its* plan — init event, qᵢ, Kᵢ × rounds
    joined — meets the target. The largest σᵢ is the shared σ of
    :func:`calibrate_noise_multiplier`; every other client adds less noise for the same ε.
    Clients with the same plan share one calibration; ``cache_dir`` as for
    :func:`calibrate_noise_multiplier`, per client plan.

    Raises:
        AccountingError: As :func:`calibrate_noise_multiplier`, for the first client whose own
            plan cannot meet the target (naming it).
    """
    results: dict[str, CalibrationResult] = {}
    done: dict[tuple[object, ...], CalibrationResult] = {}
    for cid, q in plan.sampling_probabilities.items():
        key = (q, plan.steps_per_round(cid), plan.rounds_joined(cid),
               plan.init_events.get(cid))
        if key not in done:
            own = FederatedPlan(
                sampling_probabilities={cid: q}, local_steps=plan.steps_per_round(cid),
                rounds=plan.rounds_joined(cid),
                init_events={cid: plan.init_events[cid]} if cid in plan.init_events else {})
            try:
                done[key] = calibrate_noise_multiplier(
                    target_epsilon=target_epsilon, target_delta=target_delta, plan=own,
                    accountant=accountant, tolerance=tolerance, cache_dir=cache_dir)
            except AccountingError as exc:
                raise AccountingError(f"client {cid!r}: {exc}") from None
        found = done[key]
        (result,) = found.per_client.values()
        results[cid] = CalibrationResult(found.noise_multiplier, found.achieved_epsilon,
                                         found.accountant, {cid: result})
    return results


def epsilon_for_plan(*, noise_multiplier: float, target_delta: float, plan: FederatedPlan,
                     accountant: str = "prv") -> float:
    """max-over-clients ε of the plan at a given σ."""
    if not noise_multiplier > 0:
        raise AccountingError(f"noise_multiplier={noise_multiplier!r} must be > 0")
    return federation_epsilon_of(
        {cid: plan.client_event(cid, noise_multiplier) for cid in plan.sampling_probabilities},
        delta=target_delta, accountant=accountant).epsilon


def max_rounds_within_budget(
    *,
    noise_multiplier: float,
    target_epsilon: float,
    target_delta: float,
    plan: FederatedPlan,
    accountant: str = "prv",
    max_rounds: int = 100_000,
) -> int:
    """Largest number of rounds (every client in every round) whose ε stays ≤ target.

    ``plan.rounds`` is ignored; ``plan.participation`` must be ``None``.
    """
    _check_targets(target_epsilon, target_delta)
    if not noise_multiplier > 0:
        raise AccountingError(f"noise_multiplier={noise_multiplier!r} must be > 0")
    if plan.participation is not None:
        raise AccountingError("max_rounds_within_budget needs a plan without participation")

    def eps(rounds: int) -> float:
        return federation_epsilon_of(
            {cid: plan.client_event(cid, noise_multiplier, rounds=rounds)
             for cid in plan.sampling_probabilities},
            delta=target_delta, accountant=accountant).epsilon

    if eps(0) > target_epsilon:
        return 0
    low, high = 0, 1
    while eps(high) <= target_epsilon:
        low, high = high, high * 2
        if high > max_rounds:
            return max_rounds if eps(max_rounds) <= target_epsilon else _bisect(eps, low,
                                                                                max_rounds,
                                                                                target_epsilon)
    return _bisect(eps, low, high, target_epsilon)


def _bisect(eps: Callable[[int], float], low: int, high: int, target: float) -> int:
    while high - low > 1:
        middle = (low + high) // 2
        if eps(middle) <= target:
            low = middle
        else:
            high = middle
    return low
