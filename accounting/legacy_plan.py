"""A stand-in plan for ledgers written before runs recorded their plan.

Ledgers of ``fedsb-dp/ledger/v1`` written before the plan existed carry no
``metadata["recorded_plan"]``. For those only, the audit rebuilds the plan from the run's
``config.json`` settings, the one place outside the ledger where the old code kept them. The
settings names read here are frozen: they describe runs already on disk, so this module never
follows later changes to the run settings, and new runs never reach it.

Every number is still checked against the ledger's own events, so an edited ``config.json``
can make such an audit fail but not pass a run the events contradict.
"""

from __future__ import annotations

from typing import Any

from accounting.errors import AccountingError
from accounting.events import DpEvent, GaussianDpEvent, NonPrivateDpEvent, PoissonSampledDpEvent
from accounting.ledger import PrivacyLedger
from accounting.plan import RecordedPlan

FEDERATION = "federation"


def _init_record(settings: dict[str, Any], ledger: PrivacyLedger) -> dict[str, Any]:
    init: dict[str, Any] = {"method": settings.get("init", "w0-svd")}
    if init["method"] == "gradient-svd":
        init.update(source=settings.get("init_source", "dp"),
                    examples=settings.get("init_examples"),
                    noise_multiplier=settings.get("init_noise_multiplier"))
        reference = (ledger.metadata.get("init") or {}).get("data")
        if reference is not None:
            init["data"] = reference
        elif settings.get("init_data"):
            init["data"] = {"source": settings["init_data"]}  # no digest: flagged by the audit
    return init


def _init_events(init: dict[str, Any], sizes: dict[str, int]) -> dict[str, DpEvent]:
    if init["method"] != "gradient-svd" or init.get("source") == "public":
        return {}
    sigma = init.get("noise_multiplier")
    if init.get("source") == "nonprivate" or sigma == 0:
        return {cid: NonPrivateDpEvent() for cid in sizes}
    examples = init.get("examples")
    if not isinstance(examples, int) or sigma is None:
        raise AccountingError("config.json lacks init_examples or init_noise_multiplier for "
                              "its DP gradient-svd init")
    return {cid: PoissonSampledDpEvent(examples / n, GaussianDpEvent(float(sigma)))
            for cid, n in sizes.items()}


def plan_from_settings(settings: dict[str, Any], ledger: PrivacyLedger,
                       noise_multiplier: float | None) -> RecordedPlan:
    """The plan an old run's settings imply (see the module docstring).

    Args:
        settings: ``config.json["config"]``.
        ledger: The run's ledger (keys, sizes, targets, init data reference).
        noise_multiplier: σ as the run recorded it (ledger metadata or ``progress.json``).

    Raises:
        AccountingError: If the settings cannot describe a plan (naming what is missing).
    """
    if not settings:
        raise AccountingError("config.json has no settings to stand in for the plan")
    if noise_multiplier is None:
        raise AccountingError("neither the ledger metadata nor progress.json records σ")
    participation = float(settings.get("participation", 1.0))
    client_level = ledger.unit == "client"
    if client_level:
        rates = {FEDERATION: participation}
        rule: dict[str, Any] = {"rule": "poisson-cohort", "probability": participation}
        clip = settings.get("client_clip_norm")
    else:
        batch = settings.get("batch_size")
        if not isinstance(batch, int):
            raise AccountingError(f"config.json batch_size={batch!r} is not an integer")
        rates = {cid: batch / n for cid, n in ledger.dataset_sizes.items()}
        clients = len(ledger.clients)
        rule = ({"rule": "all"} if participation >= 1.0 else {
            "rule": "seeded-sample", "fraction": participation,
            "clients_per_round": max(int(settings.get("min_clients", 1)),
                                     round(participation * clients))})
        clip = settings.get("max_grad_norm")
    if clip is None:
        raise AccountingError("config.json records no clipping bound "
                              f"({'client_clip_norm' if client_level else 'max_grad_norm'})")
    init = _init_record(settings, ledger)
    return RecordedPlan(
        unit=ledger.unit, rounds=int(settings.get("rounds", 0)),
        local_steps=1 if client_level else int(settings.get("local_steps", 0)),
        sampling_probabilities=rates, noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip),
        accountant=settings.get("accountant", "prv"), target_epsilon=ledger.target_epsilon,
        target_delta=ledger.target_delta,
        init_events={} if client_level else _init_events(init, ledger.dataset_sizes),
        init=init, participation=rule)


__all__ = ["plan_from_settings"]
