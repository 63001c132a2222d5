"""Independent audit of a run (or sweep) directory, torch-free.

:func:`audit_run` reads what the round protocol wrote (``ledger.json``, ``provenance.json``,
``summary.json``, ``metrics.jsonl``, and of ``config.json`` only its stored digest), validates
the ledger (schema and hash), recomputes every client's ε with the PRV bounds, PLD and RDP,
checks PRV_lower ≤ PLD ≤ PRV_upper ≤ RDP, compares with the ε the run claimed, and compares
the ledger's events with the **plan recorded in the ledger** (:class:`accounting.plan.
RecordedPlan`: σ, qᵢ, local steps, rounds, participation rule, init events, clip norm, δ,
target). It flags releases that void or weaken the guarantee: non-private events (ε = ∞),
δ ≥ 1/N, seeded (reproducible) noise, non-Poisson sampling, step events whose σ or q is not
the plan's, keys charged a different number of steps than rounds joined × local steps, and an
initialisation whose charge is not the plan's (a data-dependent gradient-SVD init must be
charged ``PoissonSampled(n_init/N_i, Gaussian(σ_init))`` once per client; a ``public`` one must
name its public data with a digest).

A ledger written before plans were recorded has none; its plan is then rebuilt from the old
``config.json`` settings (:mod:`accounting.legacy_plan`) and the report says so.

The result is an :class:`AuditReport` (checks, per-client ε table, plain-language verdict).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from accounting.accountants import compute_epsilon
from accounting.errors import AccountingError, LedgerIntegrityError
from accounting.events import (
    GaussianDpEvent,
    NonPrivateDpEvent,
    PoissonSampledDpEvent,
    event_from_dict,
    flatten,
)
from accounting.ledger import PrivacyLedger
from accounting.legacy_plan import plan_from_settings
from accounting.plan import RecordedPlan

RUN_FILES = ("config.json", "ledger.json", "metrics.jsonl", "provenance.json", "summary.json",
             "progress.json")
REQUIRED_FILES = ("config.json", "ledger.json", "provenance.json", "summary.json")
TOLERANCE = 1e-3  # relative slack for comparing accountants and claims

Check = tuple[str, bool, str]


@dataclass
class RunDirectory:
    """The files of one run directory, parsed (``None`` where missing or unreadable).

    Attributes:
        path: The directory.
        config: ``config.json`` (``{"config": {...}, "digest": ...}``).
        ledger: The validated ledger, or ``None`` if it failed to load.
        ledger_error: Why the ledger did not load.
        metrics: Lines of ``metrics.jsonl``.
        provenance: ``provenance.json``.
        summary: ``summary.json``.
        progress: ``progress.json``.
        missing: Required files that are absent.
        errors: Files that exist but are not valid JSON.
    """

    path: str
    config: dict[str, Any] | None = None
    ledger: PrivacyLedger | None = None
    ledger_error: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """The run's settings (``config.json["config"]``), or ``{}``."""
        return dict((self.config or {}).get("config") or {})


def _read_json(path: str, errors: dict[str, str]) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        errors[os.path.basename(path)] = f"{type(exc).__name__}: {exc}"
        return None


def load_run(path: str) -> RunDirectory:
    """Read a run directory; integrity problems are recorded, not raised.

    Raises:
        AccountingError: If ``path`` is not a directory.
    """
    if not os.path.isdir(path):
        raise AccountingError(f"run directory {path!r} does not exist or is not a directory")
    run = RunDirectory(path=path)
    run.missing = [name for name in REQUIRED_FILES if not os.path.exists(os.path.join(path, name))]
    for name, attribute in (("config.json", "config"), ("provenance.json", "provenance"),
                            ("summary.json", "summary"), ("progress.json", "progress")):
        full = os.path.join(path, name)
        if os.path.exists(full):
            setattr(run, attribute, _read_json(full, run.errors))
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        run.metrics.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        run.errors["metrics.jsonl"] = f"line {number}: {exc}"
    ledger = os.path.join(path, "ledger.json")
    if os.path.exists(ledger):
        try:
            run.ledger = PrivacyLedger.load(ledger)
        except (LedgerIntegrityError, AccountingError, OSError) as exc:
            run.ledger_error = str(exc)
    return run


def is_run_dir(path: str) -> bool:
    """Whether ``path`` looks like a run directory (it holds a ledger)."""
    return os.path.isfile(os.path.join(path, "ledger.json"))


@dataclass
class AuditReport:
    """The audit of a run (or a sweep of runs).

    Attributes:
        path: The audited directory.
        checks: (name, passed, detail) for every check, in order.
        epsilons: One row per client (pandas DataFrame): records, steps, planned steps,
            q, σ, PRV lower/estimate/upper, PLD, RDP, the claimed ε, non-private flag.
        federation: Federation ε (max over clients) per accountant.
        verdict: Plain-language summary.
        passed: True when every check passed.
    """

    path: str
    checks: list[Check]
    epsilons: Any
    federation: dict[str, float]
    verdict: str
    passed: bool

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c[1]]

    def format(self) -> str:
        """A printable report (checks, ε table, verdict)."""
        lines = [f"audit of {self.path}"]
        for name, ok, detail in self.checks:
            lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
        if self.federation:
            lines.append("  federation ε: " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in self.federation.items()))
        if self.epsilons is not None and len(self.epsilons):
            table = self.epsilons.to_string(index=False, float_format=lambda x: f"{x:.4f}")
            lines.extend("  " + line for line in table.splitlines())
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _leq(a: float | None, b: float | None) -> bool:
    """Whether a ≤ b up to the relative tolerance (missing values pass)."""
    if a is None or b is None:
        return True
    if math.isinf(a) and math.isinf(b):
        return True
    return a <= b + TOLERANCE * max(abs(b), 1e-12)


def _atom_kinds(event: Any) -> tuple[set[str], set[float], set[float]]:
    """Atom type names, Gaussian noise multipliers and Poisson rates in an event."""
    kinds, sigmas, rates = set(), set(), set()
    for atom, _count in flatten(event):
        kinds.add(type(atom).__name__)
        inner = atom
        while isinstance(inner, PoissonSampledDpEvent):
            rates.add(inner.sampling_probability)
            inner = inner.event
        if isinstance(inner, GaussianDpEvent):
            sigmas.add(inner.noise_multiplier)
        kinds.add(type(inner).__name__)
    return kinds, sigmas, rates


def _step_parameters(ledger: PrivacyLedger, client_id: str
                     ) -> tuple[set[str], set[float], set[float]]:
    """Atom kinds, σs and qs of the client's DP-SGD step releases (entries and reservations)."""
    body = ledger.to_json_dict()["body"]
    events = [e["event"] for e in body["entries"]
              if e["client"] == client_id and e["kind"] == "dp-sgd"]
    events += [item["releases"][client_id]["event"] for item in body["pending"]
               if item["kind"] == "dp-sgd" and client_id in item["releases"]]
    kinds: set[str] = set()
    sigmas: set[float] = set()
    rates: set[float] = set()
    for event in events:
        k, s, r = _atom_kinds(event_from_dict(event))
        kinds |= k
        sigmas |= s
        rates |= r
    return kinds, sigmas, rates


def _client_rows(ledger: PrivacyLedger, claimed: dict[str, float], planned: dict[str, int],
                 eps_error: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows = []
    cache: dict[Any, dict[str, Any]] = {}
    delta = ledger.target_delta
    for cid in ledger.clients:
        event = ledger.client_event(cid)
        if event not in cache:
            prv = compute_epsilon(event, delta=delta, accountant="prv", eps_error=eps_error)
            pld = compute_epsilon(event, delta=delta, accountant="pld")
            rdp = compute_epsilon(event, delta=delta, accountant="rdp")
            used_prv = prv.accountant == "prv"
            cache[event] = {
                "prv_lower": prv.lower if used_prv else None,
                "prv_estimate": prv.estimate if used_prv else None,
                "prv_upper": prv.epsilon if used_prv else None,
                "pld": pld.epsilon, "rdp": rdp.epsilon,
                "prv_fallback": prv.fallback_reason, "non_private": prv.non_private,
            }
        # q and σ of the training steps only: an init release has its own rate (n_init/N_i).
        _, sigmas, rates = _step_parameters(ledger, cid)
        rows.append({
            "client": cid, "records": ledger.dataset_sizes[cid], "steps": ledger.steps(cid),
            "planned_steps": planned.get(cid),
            "q": min(rates) if len(rates) == 1 else (None if not rates else max(rates)),
            "sigma": min(sigmas) if sigmas else None, **cache[event],
            "claimed": claimed.get(cid),
        })
    federation = {}
    for key in ("prv_upper", "pld", "rdp"):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            federation[key] = max(values)
    return rows, federation


def _plan_of(run: RunDirectory, ledger: PrivacyLedger) -> tuple[RecordedPlan | None, Check]:
    """The ledger's recorded plan or, for a ledger that predates it, the settings' stand-in."""
    name = "recorded plan"
    plan = ledger.plan
    if plan is not None:
        sigma = (f"σ = {plan.noise_multiplier:.6g}" if not plan.per_client else
                 "per-client σᵢ " + ", ".join(f"{k} {v:.6g}"
                                               for k, v in plan.noise_multipliers.items()))
        return plan, (name, True, f"the ledger records the plan ({plan.to_dict()['format']}): "
                                  f"{plan.unit}-level, {plan.rounds} rounds × "
                                  f"{plan.local_steps} release(s), {sigma}, participation "
                                  f"{plan.rule!r}")
    sigma = ledger.metadata.get("noise_multiplier",
                                (run.progress or {}).get("noise_multiplier"))
    try:
        plan = plan_from_settings(run.settings, ledger, sigma)
    except AccountingError as exc:
        return None, (name, False, f"the ledger predates the recorded plan and config.json "
                                   f"cannot stand in for it: {exc}")
    return plan, (name, True, f"NOTE: {PREDATES_PLAN}")


#: What the report says about a ledger written before runs recorded their plan.
PREDATES_PLAN = ("the ledger predates the recorded plan; the plan was rebuilt from "
                 "config.json's settings and checked against the ledger's events")


def _rounds_joined(run: RunDirectory, ledger: PrivacyLedger, plan: RecordedPlan,
                   ) -> tuple[dict[str, int], int]:
    """Ledger key → rounds it was charged for, and the rounds run (completed + reserved)."""
    reserved = [item for item in ledger.to_json_dict()["body"]["pending"]
                if item["kind"] == "dp-sgd"]
    rounds_run = len(run.metrics) + len(reserved)
    if plan.charges_every_round():
        return {key: rounds_run for key in ledger.clients}, rounds_run
    # A seeded sample: the released metrics name each completed round's participants.
    joined = {key: 0 for key in ledger.clients}
    for line in run.metrics:
        for key in line.get("participants", []):
            if key in joined:
                joined[key] += 1
    for item in reserved:
        for key in item["releases"]:
            joined[key] += 1
    return joined, rounds_run


def audit_run(path: str, *, eps_error: float = 0.01) -> AuditReport:
    """Audit one run directory.

    Args:
        path: The run directory.
        eps_error: PRV's ε error for the recomputation.

    Returns:
        The report; ``passed`` is False if any check failed.
    """
    import pandas as pd

    run = load_run(path)
    checks: list[Check] = []
    checks.append(("files", not run.missing and not run.errors,
                   "all present and readable" if not run.missing and not run.errors else
                   f"missing {run.missing}, unreadable {run.errors}"))
    ledger = run.ledger
    if ledger is None:
        detail = run.ledger_error or "ledger.json is missing"
        checks.append(("ledger integrity", False, detail))
        return _finish(path, checks, pd.DataFrame(), {})
    checks.append(("ledger integrity", True,
                   f"schema and sha256 valid; unit={ledger.unit}, {len(ledger.clients)} clients, "
                   f"N_total={ledger.n_total}"))
    plan, plan_check = _plan_of(run, ledger)
    checks.append(plan_check)
    checks.extend(_provenance_checks(run, ledger))
    metadata = ledger.metadata
    summary = run.summary or {}
    privacy = summary.get("privacy") or {}
    claimed = {cid: float(v) for cid, v in (privacy.get("per_client_epsilon") or {}).items()}
    planned: dict[str, int] = {}
    rounds_run = 0
    if plan is not None:
        joined, rounds_run = _rounds_joined(run, ledger, plan)
        planned = {key: plan.local_steps * n for key, n in joined.items()}
    rows, federation = _client_rows(ledger, claimed, planned, eps_error)
    table = pd.DataFrame(rows)

    # Non-private releases make ε infinite.
    nonprivate = [r["client"] for r in rows if r["non_private"]]
    checks.append(("private releases only", not nonprivate,
                   "no non-private release" if not nonprivate else
                   f"NON-PRIVATE release (ε = ∞) on {nonprivate}"))
    # δ policy (the plan's δ is the header's: the ledger refuses a plan that differs).
    delta, n_total = ledger.target_delta, ledger.n_total
    small = delta < 1 / n_total if ledger.unit == "example" else True
    checks.append(("delta < 1/N", small and not ledger.large_delta,
                   f"δ = {delta:g}, 1/N_total = {1 / n_total:.3g}" + (
                       "" if small and not ledger.large_delta else
                       " — δ ≥ 1/N accepted by override: a mechanism may publish a record")))
    # Seeded noise is reproducible: not a private release.
    seeded = metadata.get("seed_mode") == "seeded" or metadata.get("noise_is_release") is False
    checks.append(("noise is a private release", not seeded,
                   "noise from OS entropy" if not seeded else
                   "SEEDED run: anyone with the seed can subtract the noise; not a private "
                   "release"))
    # Sampler and accountant must match.
    sampling = metadata.get("sampling")
    dp_sgd_kinds: set[str] = set()
    for entry in ledger.to_json_dict()["body"]["entries"]:
        if entry["kind"] == "dp-sgd":
            dp_sgd_kinds |= _atom_kinds(event_from_dict(entry["event"]))[0]
    poisson = sampling == "poisson" and (
        not dp_sgd_kinds or dp_sgd_kinds <= {"PoissonSampledDpEvent", "GaussianDpEvent",
                                             "NonPrivateDpEvent"})
    checks.append(("Poisson sampling", poisson,
                   f"sampling={sampling!r}, step events {sorted(dp_sgd_kinds)}"))
    if plan is not None:
        checks.append(_steps_check(plan, rows, rounds_run))
        checks.append(_event_check(plan, ledger, rows))
        checks.append(_metadata_check(plan, ledger))
        checks.append(_init_check(plan, ledger))
    checks.append(_invariant_check(rows))
    checks.extend(_claim_checks(ledger, privacy, rows, federation, plan))
    return _finish(path, checks, table, federation, unit=ledger.unit,
                   note=PREDATES_PLAN if plan is not None and ledger.plan is None else None)


def _provenance_checks(run: RunDirectory, ledger: PrivacyLedger) -> list[Check]:
    """The config digest provenance names, the seed mode everywhere, the versions."""
    checks: list[Check] = []
    provenance = run.provenance or {}
    stored = (run.config or {}).get("digest")
    named = provenance.get("config_digest")
    # Compared as stored: the digest is the run's to define, the audit only checks that the
    # provenance and config.json name the same settings.
    same = stored is not None and named == stored
    checks.append(("config", same,
                   f"provenance and config.json name the same config digest {str(stored)[:12]}…"
                   if same else f"config digest in config.json {str(stored)[:12]}… ≠ "
                   f"provenance's {str(named)[:12]}…"))
    prov_seed = str(provenance.get("seed_mode", ""))
    meta_seed = ledger.metadata.get("seed_mode")
    consistent = (prov_seed.startswith("seeded") == (meta_seed == "seeded")
                  and (run.summary or {}).get("seed_mode", meta_seed) == meta_seed)
    has_versions = bool(provenance.get("versions"))
    checks.append(("provenance", consistent and has_versions,
                   f"seed mode {meta_seed!r} everywhere, versions recorded"
                   if consistent and has_versions else
                   f"seed mode ledger={meta_seed!r}, provenance={prov_seed!r}, "
                   f"summary={(run.summary or {}).get('seed_mode')!r}; "
                   f"versions {'present' if has_versions else 'MISSING'}"))
    return checks


def _steps_check(plan: RecordedPlan, rows: list[dict[str, Any]], rounds_run: int) -> Check:
    """Every key charged local steps × the rounds it joined, and no round beyond the plan."""
    off = {r["client"]: (r["steps"], r["planned_steps"]) for r in rows
           if r["planned_steps"] is not None and r["steps"] != r["planned_steps"]}
    problems = [f"{c} {s}≠{p}" for c, (s, p) in off.items()]
    detail = "charged ≠ planned (steps, planned): " + ", ".join(problems) if problems else ""
    if rounds_run > plan.rounds:
        detail = "; ".join(filter(None, [detail, f"{rounds_run} rounds run, the plan has "
                                                  f"{plan.rounds}"]))
    return ("steps match the plan", not detail,
            detail or f"every key charged rounds joined × {plan.local_steps} local step(s) "
                      f"({rounds_run} of {plan.rounds} planned rounds run)")


def _event_check(plan: RecordedPlan, ledger: PrivacyLedger,
                 rows: list[dict[str, Any]]) -> Check:
    """σ and q of every training release against the plan's σ and qᵢ."""
    problems = []
    for row in rows:
        if row["non_private"] or row["steps"] == 0:
            continue
        key = row["client"]
        _, sigmas, rates = _step_parameters(ledger, key)
        # Each key against its own σᵢ when the plan has per-client noise.
        planned = plan.sigma_of(key)
        off_sigma = sorted(s for s in sigmas if not math.isclose(s, planned, rel_tol=1e-9))
        if off_sigma:
            problems.append(f"{key} σ {', '.join(f'{s:.6g}' for s in off_sigma)} ≠ plan σ "
                            f"{planned:.6g}")
        q = plan.sampling_probabilities[key]
        off_rate = sorted(r for r in rates if not math.isclose(r, q, rel_tol=1e-9))
        if off_rate:
            problems.append(f"{key} q {', '.join(f'{r:.6g}' for r in off_rate)} ≠ plan q "
                            f"{q:.6g}")
        elif not rates and q < 1:
            problems.append(f"{key} steps are not subsampled; the plan's q is {q:.6g}")
    return ("step events match the plan", not problems,
            "σ and q of every training release as planned" if not problems
            else "; ".join(problems))


def _metadata_check(plan: RecordedPlan, ledger: PrivacyLedger) -> Check:
    """The plan's σ and clip norm against the mechanism settings the ledger also records."""
    metadata = ledger.metadata
    problems = []
    sigma = metadata.get("noise_multiplier")
    if sigma is not None and not math.isclose(sigma, plan.noise_multiplier, rel_tol=1e-9):
        problems.append(f"σ {plan.noise_multiplier} ≠ ledger's {sigma}")
    recorded = metadata.get("noise_multipliers")
    if (recorded or None) != plan.noise_multipliers:
        problems.append(f"per-client σ {plan.noise_multipliers} ≠ ledger's {recorded}")
    clip = metadata.get("client_clip_norm" if plan.unit == "client" else "max_grad_norm")
    if clip is not None and clip != plan.clip_norm:
        problems.append(f"clip norm {plan.clip_norm} ≠ ledger's {clip}")
    return ("plan matches the ledger metadata", not problems,
            f"σ and clip norm {plan.clip_norm:g} as the ledger records them" if not problems
            else "; ".join(problems))


def _init_releases(ledger: PrivacyLedger) -> dict[str, list[tuple[Any, int]]]:
    """Client id → the init releases charged to it (entries and reservations)."""
    body = ledger.to_json_dict()["body"]
    out: dict[str, list[tuple[Any, int]]] = {cid: [] for cid in ledger.clients}
    for entry in body["entries"]:
        if entry["kind"] == "init":
            out[entry["client"]].append((event_from_dict(entry["event"]), entry["count"]))
    for item in body["pending"]:
        if item["kind"] == "init":
            for cid, release in item["releases"].items():
                out[cid].append((event_from_dict(release["event"]), release["count"]))
    return out


def _event_text(event: Any) -> str:
    if isinstance(event, PoissonSampledDpEvent) and isinstance(event.event, GaussianDpEvent):
        return (f"PoissonSampled(q={event.sampling_probability:.6g}, "
                f"Gaussian(σ={event.event.noise_multiplier:g}))")
    return repr(event)


def _describe(releases: list[tuple[Any, int]]) -> str:
    if not releases:
        return "no init charge"
    return ", ".join(f"{count}× {_event_text(event)}" for event, count in releases)


def _charge_problem(cid: str, releases: list[tuple[Any, int]], expected: Any) -> str | None:
    """Why one key's init charge is not the plan's (exactly once ``expected``), or None."""
    if expected is None:
        return None if not releases else (f"{cid}: init charged {_describe(releases)}, the "
                                          "plan has no init release")
    if len(releases) == 1 and releases[0][1] == 1 and releases[0][0] == expected:
        return None
    if isinstance(expected, PoissonSampledDpEvent) and any(
            isinstance(e, GaussianDpEvent) for e, _ in releases):
        return (f"{cid}: OLD unsampled charge {_describe(releases)}: that init summed the "
                "first n_init records, whose sensitivity is 2·C_init, not the C_init charged — "
                "ε is understated; re-run with today's sampled DP init")
    if not releases:
        return (f"{cid}: the plan charges 1× {_event_text(expected)} for its init; the ledger "
                "has no init charge")
    return (f"{cid}: init charged {_describe(releases)}; the plan charges 1× "
            f"{_event_text(expected)}")


def _init_plan_problems(plan: RecordedPlan, ledger: PrivacyLedger) -> tuple[list[str], str]:
    """Whether the plan's init events are what its init record says it reads."""
    init = plan.init
    if init.get("method") != "gradient-svd":
        return [], f"init={init.get('method')!r} reads no record"
    source = init.get("source", "dp")
    if source == "public":
        reference = init.get("data") or {}
        if not reference.get("source") or not reference.get("records_sha256"):
            return [f"init_source='public' without an --init-data reference with a records "
                    f"digest ({reference or 'none'}): the code that wrote this run computed the "
                    "'public' init from the clients' own records and charged nothing — those "
                    "records have ε = ∞ for the init"], ""
        return [], (f"public init data {reference['source']!r} (records sha256 "
                    f"{reference['records_sha256'][:12]}…), no client charged")
    if plan.unit != "example":
        return [f"gradient-svd init with source {source!r} reads client records (a "
                f"record-level release) in a {plan.unit}-level run"], ""
    sigma = init.get("noise_multiplier")
    if source == "nonprivate" or sigma == 0:
        bad = [k for k in ledger.clients
               if not isinstance(plan.init_events.get(k), NonPrivateDpEvent)]
        return ([f"non-private init not planned as NonPrivate for {bad}"] if bad else [],
                "non-private init charged as NonPrivate (ε = ∞) to every client")
    examples = init.get("examples")
    if not isinstance(examples, int) or sigma is None:
        return ["the init record lacks examples or noise_multiplier for the DP init"], ""
    problems = []
    for key, size in ledger.dataset_sizes.items():
        planned = plan.init_events.get(key)
        if not (isinstance(planned, PoissonSampledDpEvent)
                and isinstance(planned.event, GaussianDpEvent)
                and math.isclose(planned.sampling_probability, examples / size, rel_tol=1e-9)
                and math.isclose(planned.event.noise_multiplier, sigma, rel_tol=1e-9)):
            problems.append(f"{key}: a data-dependent init (gradient-svd, source dp) planned as "
                            f"{_event_text(planned) if planned else 'no init charge'}; "
                            f"expected PoissonSampled(q={examples / size:.6g}, "
                            f"Gaussian(σ={sigma:g}))")
    return problems, (f"every client charged PoissonSampled(q = {examples}/N_i, "
                      f"Gaussian(σ_init = {sigma:g})) once")


def _init_check(plan: RecordedPlan, ledger: PrivacyLedger) -> Check:
    """The init record, the plan's init events and the ledger's init charges agree."""
    problems, detail = _init_plan_problems(plan, ledger)
    releases = _init_releases(ledger)
    problems += [p for key in ledger.clients
                 if (p := _charge_problem(key, releases[key], plan.init_events.get(key)))]
    return ("init matches the ledger", not problems,
            detail if not problems else "; ".join(problems))


def _invariant_check(rows: list[dict[str, Any]]) -> Check:
    bad, notes = [], []
    for r in rows:
        if r["non_private"]:
            continue
        chain = [("PRV_lower", r["prv_lower"]), ("PLD", r["pld"]), ("PRV_upper", r["prv_upper"]),
                 ("RDP", r["rdp"])]
        if r["prv_fallback"]:
            notes.append(f"{r['client']}: PRV unavailable ({r['prv_fallback'][:60]}…)")
        for (na, a), (nb, b) in zip(chain, chain[1:], strict=False):
            if not _leq(a, b):
                bad.append(f"{r['client']}: {na} {_fmt(a)} > {nb} {_fmt(b)}")
        if not _leq(r["pld"], r["rdp"]):
            bad.append(f"{r['client']}: PLD {_fmt(r['pld'])} > RDP {_fmt(r['rdp'])}")
    detail = ("PRV_lower ≤ PLD ≤ PRV_upper ≤ RDP for every client"
              f" (relative tolerance {TOLERANCE:g})" if not bad else "; ".join(sorted(set(bad))))
    if notes:
        detail += "; " + "; ".join(notes)
    return ("accountant invariants", not bad, detail)


_COLUMN = {"prv": "prv_upper", "pld": "pld", "rdp": "rdp"}


def _recomputed(federation: dict[str, float], rows: list[dict[str, Any]],
                accountant: str) -> float | None:
    if any(r["non_private"] for r in rows):
        return math.inf
    return federation.get(_COLUMN.get(accountant, "prv_upper"), federation.get("pld"))


def _claim_checks(ledger: PrivacyLedger, privacy: dict[str, Any], rows: list[dict[str, Any]],
                  federation: dict[str, float], plan: RecordedPlan | None) -> list[Check]:
    checks: list[Check] = []
    claimed = privacy.get("epsilon")
    accountant = privacy.get("accountant", "prv")
    key = _COLUMN.get(accountant, "prv_upper")
    recomputed = _recomputed(federation, rows, accountant)
    if claimed is None:
        checks.append(("claim matches recomputation", False, "summary.json has no privacy.epsilon"))
    else:
        claimed = float(claimed)
        ok = recomputed is None or _leq(recomputed, claimed)
        per_client = [f"{r['client']} claimed {_fmt(r['claimed'])} < recomputed "
                      f"{_fmt(r[key] if r[key] is not None else r['pld'])}"
                      for r in rows if r["claimed"] is not None
                      and not _leq(r[key] if r[key] is not None else r["pld"], r["claimed"])]
        ok = ok and not per_client
        checks.append(("claim matches recomputation", ok,
                       f"claimed ε = {_fmt(claimed)}, recomputed ({accountant}) "
                       f"{_fmt(recomputed)}" + ("" if ok else " — the run UNDERSTATES ε")
                       + (f"; {'; '.join(per_client)}" if per_client else "")))
    # The target as planned, with the accountant σ was calibrated and guarded with.
    target = plan.target_epsilon if plan is not None else ledger.target_epsilon
    planned_accountant = plan.accountant if plan is not None else accountant
    against = _recomputed(federation, rows, planned_accountant)
    if target is not None and against is not None:
        checks.append(("within target", _leq(against, float(target)),
                       f"recomputed ε = {_fmt(against)} ({planned_accountant}), target "
                       f"{target}"))
    return checks


def _finish(path: str, checks: list[Check], table: Any, federation: dict[str, float],
            note: str | None = None, unit: str = "example") -> AuditReport:
    failed = [c for c in checks if not c[1]]
    if not failed:
        worst = federation.get("prv_upper", federation.get("pld"))
        verdict = (f"PASS: the ledger is intact and every check holds; the run is "
                   f"(ε = {_fmt(worst)}, δ)-DP per {'client' if unit == 'client' else 'record'} as "
                   "recomputed independently.")
    else:
        names = ", ".join(c[0] for c in failed)
        verdict = (f"FAIL ({len(failed)} of {len(checks)} checks): {names}. "
                   "Do not rely on the run's stated guarantee until these are explained.")
    if note:
        verdict += f" Note: {note}."
    return AuditReport(path, checks, table, federation, verdict, not failed)


def audit_sweep(path: str, *, eps_error: float = 0.01) -> AuditReport:
    """Audit every run directory directly under ``path`` (a sweep), or ``path`` itself.

    Checks are prefixed with the run's name; the ε table gains a ``run`` column.

    Raises:
        AccountingError: If ``path`` holds no run directory.
    """
    import pandas as pd

    if is_run_dir(path):
        return audit_run(path, eps_error=eps_error)
    if not os.path.isdir(path):
        raise AccountingError(f"{path!r} is not a directory")
    runs = sorted(d for d in os.listdir(path) if is_run_dir(os.path.join(path, d)))
    if not runs:
        raise AccountingError(f"{path!r} is neither a run directory (no ledger.json) nor a "
                              "sweep of run directories")
    checks: list[Check] = []
    tables, federation = [], {}
    for name in runs:
        report = audit_run(os.path.join(path, name), eps_error=eps_error)
        checks.extend((f"{name}/{c}", ok, d) for c, ok, d in report.checks)
        if len(report.epsilons):
            tables.append(report.epsilons.assign(run=name))
        for key, value in report.federation.items():
            federation[f"{name}/{key}"] = value
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return _finish(path, checks, table, federation)


__all__ = ["AuditReport", "RUN_FILES", "RunDirectory", "audit_run", "audit_sweep", "is_run_dir",
           "load_run"]
