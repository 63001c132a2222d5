"""Turning events into (ε, δ): PRV (prv-accountant), PLD and RDP (Google dp_accounting).

* ``prv`` — Gopi et al.'s numerical composition. Returns a (lower, estimate, upper) bracket;
  the **upper** bound is the guarantee. A fresh accountant is built for every query. The only
  PyPI release (0.2.0) raises on ordinary inputs ("Discrete mean differs from continuous mean
  significantly"); then the PLD accountant answers instead and the result says so.
* ``pld`` — dp_accounting's privacy-loss-distribution accountant with pessimistic
  discretisation: an upper bound up to its discretisation interval.
* ``rdp`` — dp_accounting's Rényi accountant; looser, kept as an independent cross-check.

Neighbouring relation everywhere: add or remove one record.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from accounting.errors import AccountingError
from accounting.events import (
    ComposedDpEvent,
    DpEvent,
    GaussianDpEvent,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
    flatten,
    to_dp_accounting,
)

ACCOUNTANTS = ("prv", "pld", "rdp")
# Opacus' RDPAccountant.DEFAULT_ALPHAS, so RDP figures line up with Opacus users' numbers.
OPACUS_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(set(OPACUS_RDP_ORDERS) | {64, 80, 96, 128, 192, 256, 512, 1024}))
PLD_DISCRETIZATION = 1e-4
# prv-accountant's grid grows with ε (its domain comes from an RDP bound); past this ε a
# single query takes minutes, so the PLD accountant answers instead and says so.
PRV_MAX_EPSILON = 50.0
# ε of one history is a pure function of its atoms and the query, and one run asks the same
# question many times (calibration, then every round's report): answers are memoised per
# process. Only the arithmetic is skipped; nothing is stored on disk or shared across processes.
_MEMO_SIZE = 4096
_memo: OrderedDict[tuple[Any, ...], EpsilonResult] = OrderedDict()


def clear_epsilon_cache() -> None:
    """Forget every memoised ε (for timing an accountant, or after changing one)."""
    _memo.clear()


@dataclass(frozen=True)
class EpsilonResult:
    """ε of one event history at a given δ.

    Attributes:
        epsilon: The guarantee (PRV upper bound, or the PLD/RDP value); ``inf`` if non-private.
        lower: A lower bound on the true ε of the mechanism (PRV), else ``None``.
        estimate: PRV's point estimate (PLD: its value; RDP: ``None``).
        accountant: The accountant that produced ``epsilon``.
        requested_accountant: The one asked for (differs after a fallback).
        delta: δ.
        fallback_reason: Why the requested accountant was not used, if it was not.
        parameters: Error/discretisation parameters used.
        non_private: True when a non-private release makes ε infinite.
    """

    epsilon: float
    lower: float | None
    estimate: float | None
    accountant: str
    requested_accountant: str
    delta: float
    fallback_reason: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    non_private: bool = False


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise AccountingError(f"delta={delta!r} must be in (0, 1)")


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise AccountingError(f"accountant={name!r} is not one of {ACCOUNTANTS}")


def _atoms(event: DpEvent) -> tuple[list[tuple[DpEvent, int]], bool]:
    """Atomic events with counts, without no-ops; and whether anything is non-private."""
    atoms = []
    non_private = False
    for atom, count in flatten(event):
        if count == 0 or isinstance(atom, NoOpDpEvent):
            continue
        inner = atom
        while isinstance(inner, PoissonSampledDpEvent):
            if inner.sampling_probability == 0:
                inner = NoOpDpEvent()
                break
            inner = inner.event
        if isinstance(inner, NoOpDpEvent):
            continue
        if isinstance(inner, NonPrivateDpEvent) or (
            isinstance(inner, GaussianDpEvent) and inner.noise_multiplier == 0
        ):
            non_private = True
        atoms.append((atom, count))
    return atoms, non_private


def _prv_mechanism(atom: DpEvent) -> Any:
    from prv_accountant.privacy_random_variables import (
        GaussianMechanism,
        PoissonSubsampledGaussianMechanism,
    )

    if isinstance(atom, GaussianDpEvent):
        return GaussianMechanism(noise_multiplier=atom.noise_multiplier)
    if isinstance(atom, PoissonSampledDpEvent) and isinstance(atom.event, GaussianDpEvent):
        if atom.sampling_probability == 1:
            return GaussianMechanism(noise_multiplier=atom.event.noise_multiplier)
        return PoissonSubsampledGaussianMechanism(
            sampling_probability=atom.sampling_probability,
            noise_multiplier=atom.event.noise_multiplier)
    return None


def _prv(atoms: list[tuple[DpEvent, int]], *, delta: float, eps_error: float,
         delta_error: float, epsilon: float | None = None) -> tuple[float, float, float]:
    from prv_accountant import PRVAccountant

    mechanisms = [_prv_mechanism(a) for a, _ in atoms]
    if any(m is None for m in mechanisms):
        kinds = sorted({type(a).__name__ for (a, _), m in zip(atoms, mechanisms, strict=True)
                        if m is None})
        raise NotImplementedError(f"prv-accountant has no mechanism for {kinds}")
    counts = [c for _, c in atoms]
    accountant = PRVAccountant(prvs=mechanisms, max_self_compositions=counts,
                               eps_error=eps_error, delta_error=delta_error)
    if epsilon is not None:
        return tuple(float(x) for x in accountant.compute_delta(epsilon, counts))
    return tuple(float(x) for x in accountant.compute_epsilon(delta, counts))


def _dp_accounting_event(atoms: list[tuple[DpEvent, int]]) -> Any:
    return to_dp_accounting(ComposedDpEvent(tuple(SelfComposedDpEvent(a, c) for a, c in atoms)))


def _pld_accountant(atoms: list[tuple[DpEvent, int]]) -> Any:
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    event = _dp_accounting_event(atoms)
    if not accountant.supports(event):
        raise AccountingError(f"the PLD accountant does not support {event!r:.120}")
    accountant.compose(event)
    return accountant


def _rdp_accountant(atoms: list[tuple[DpEvent, int]], orders: Sequence[float]) -> Any:
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders=list(orders))
    event = _dp_accounting_event(atoms)
    if not accountant.supports(event):
        raise AccountingError(f"the RDP accountant does not support {event!r:.120}")
    accountant.compose(event)
    return accountant


def compute_epsilon(
    event: DpEvent,
    *,
    delta: float,
    accountant: str = "prv",
    eps_error: float = 0.01,
    delta_error: float | None = None,
    rdp_orders: Sequence[float] = DEFAULT_RDP_ORDERS,
) -> EpsilonResult:
    """ε of ``event`` at ``delta``.

    Args:
        event: The whole history to account (one client's, typically).
        delta: Target δ in (0, 1).
        accountant: ``"prv"`` (default), ``"pld"`` or ``"rdp"``.
        eps_error: PRV's ε error (the upper bound is at most ~2·eps_error above the truth).
        delta_error: PRV's δ error (default δ/1000).
        rdp_orders: Orders of the RDP accountant.

    Returns:
        The result; ``epsilon`` is the guarantee.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    atoms, non_private = _atoms(event)
    if non_private:
        return EpsilonResult(math.inf, math.inf, math.inf, accountant, accountant, delta,
                             non_private=True)
    if not atoms:
        return EpsilonResult(0.0, 0.0, 0.0, accountant, accountant, delta)
    key = (tuple(atoms), delta, accountant, eps_error, delta_error, tuple(rdp_orders))
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key]
    result = _compute_epsilon(atoms, event, delta=delta, accountant=accountant,
                              eps_error=eps_error, delta_error=delta_error,
                              rdp_orders=rdp_orders)
    _memo[key] = result
    if len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return result


def _compute_epsilon(atoms: list[tuple[DpEvent, int]], event: DpEvent, *, delta: float,
                     accountant: str, eps_error: float, delta_error: float | None,
                     rdp_orders: Sequence[float]) -> EpsilonResult:
    if accountant == "prv":
        delta_error = delta / 1000 if delta_error is None else delta_error
        parameters = {"eps_error": eps_error, "delta_error": delta_error}
        try:
            rough = float(_rdp_accountant(atoms, DEFAULT_RDP_ORDERS).get_epsilon(delta))
            if rough > PRV_MAX_EPSILON:
                raise OverflowError(f"RDP puts ε near {rough:.3g}, beyond PRV's practical range "
                                    f"(> {PRV_MAX_EPSILON:g})")
            lower, estimate, upper = _prv(atoms, delta=delta, eps_error=eps_error,
                                          delta_error=delta_error)
            if not all(math.isfinite(x) for x in (lower, estimate, upper)):
                raise FloatingPointError(f"non-finite bracket {(lower, estimate, upper)}")
            return EpsilonResult(upper, max(lower, 0.0), estimate, "prv", "prv", delta,
                                 parameters=parameters)
        except Exception as exc:  # prv-accountant 0.2.0 raises plain RuntimeError/ValueError
            reason = (f"prv-accountant failed ({type(exc).__name__}: {exc}); "
                      "fell back to the PLD accountant")
            fallback = compute_epsilon(event, delta=delta, accountant="pld")
            return EpsilonResult(fallback.epsilon, fallback.lower, fallback.estimate, "pld",
                                 "prv", delta, fallback_reason=reason,
                                 parameters={**parameters, **fallback.parameters})
    if accountant == "pld":
        value = float(_pld_accountant(atoms).get_epsilon(delta))
        return EpsilonResult(value, None, value, "pld", "pld", delta,
                             parameters={"value_discretization_interval": PLD_DISCRETIZATION})
    value = float(_rdp_accountant(atoms, rdp_orders).get_epsilon(delta))
    return EpsilonResult(value, None, None, "rdp", "rdp", delta,
                         parameters={"orders": [min(rdp_orders), max(rdp_orders),
                                                len(rdp_orders)]})


def compute_delta(
    event: DpEvent,
    *,
    epsilon: float,
    accountant: str = "prv",
    eps_error: float = 0.01,
    delta_error: float = 1e-10,
) -> tuple[float, float, float]:
    """δ(ε) of ``event`` as (lower, estimate, upper); PLD and RDP give one value thrice."""
    _check_accountant(accountant)
    if not epsilon >= 0:
        raise AccountingError(f"epsilon={epsilon} must be ≥ 0")
    atoms, non_private = _atoms(event)
    if non_private:
        return (1.0, 1.0, 1.0)
    if not atoms:
        return (0.0, 0.0, 0.0)
    if accountant == "prv":
        return _prv(atoms, delta=0.5, eps_error=eps_error, delta_error=delta_error,
                    epsilon=epsilon)
    if accountant == "pld":
        value = float(_pld_accountant(atoms).get_delta(epsilon))
    else:
        value = float(_rdp_accountant(atoms, DEFAULT_RDP_ORDERS).get_delta(epsilon))
    return (value, value, value)


@dataclass(frozen=True)
class FederationResult:
    """ε of a federation: the max over clients (parallel composition over disjoint records).

    Attributes:
        epsilon: max over clients of each client's guarantee.
        per_client: Client id → its result.
        worst_client: The client attaining the max (``None`` with no clients).
        delta: δ.
        unit: The privacy unit of the ledger (``"example"`` or ``"client"``).
    """

    epsilon: float
    per_client: dict[str, EpsilonResult]
    worst_client: str | None
    delta: float
    unit: str


def federation_epsilon_of(
    events: dict[str, DpEvent],
    *,
    delta: float,
    accountant: str = "prv",
    unit: str = "example",
    eps_error: float = 0.01,
) -> FederationResult:
    """Max over clients of each client's ε (never the last or an average)."""
    cache: dict[DpEvent, EpsilonResult] = {}  # clients with identical histories share a result
    per_client = {}
    for cid, event in events.items():
        if event not in cache:
            cache[event] = compute_epsilon(event, delta=delta, accountant=accountant,
                                           eps_error=eps_error)
        per_client[cid] = cache[event]
    if not per_client:
        return FederationResult(0.0, {}, None, delta, unit)
    worst = max(per_client, key=lambda cid: per_client[cid].epsilon)
    return FederationResult(per_client[worst].epsilon, per_client, worst, delta, unit)


def federation_epsilon(
    ledger: Any,
    *,
    delta: float | None = None,
    accountant: str = "prv",
    eps_error: float = 0.01,
) -> FederationResult:
    """ε of a :class:`accounting.ledger.PrivacyLedger` (reserved entries count as spent)."""
    delta = ledger.target_delta if delta is None else delta
    return federation_epsilon_of(
        {cid: ledger.client_event(cid) for cid in ledger.clients},
        delta=delta, accountant=accountant, unit=ledger.unit, eps_error=eps_error)
