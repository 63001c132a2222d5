"""Independent audit of a run (or sweep) directory, torch-free.

:func:`audit_run` reads what ``fedsb_dp.federated.inprocess.run_federation`` wrote
(``config.json``, ``ledger.json``, ``metrics.jsonl``, ``provenance.json``, ``summary.json``,
``progress.json``), validates the ledger (schema and hash), the config digest and the provenance,
recomputes every client's ε with the PRV bounds, PLD and RDP, checks
PRV_lower ≤ PLD ≤ PRV_upper ≤ RDP, compares with the ε the run claimed, and flags releases that
void or weaken the guarantee: non-private events (ε = ∞), δ ≥ 1/N, seeded (reproducible) noise,
non-Poisson sampling, clients charged a different number of steps than planned, and an
initialisation whose ledger charge does not match what the config says it read (a
data-dependent gradient-SVD init must be charged ``PoissonSampled(n_init/N_i, Gaussian(σ_init))``
per client; a ``public`` one must name its public data).

The result is an :class:`AuditReport` (checks, per-client ε table, plain-language verdict).
"""

from __future__ import annotations

import hashlib
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


def _config_digest(settings: dict[str, Any]) -> str:
    # Same canonical form as RunConfig.digest(): every setting except the output directory.
    body = {k: v for k, v in settings.items() if k != "out"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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


def _planned_steps(run: RunDirectory, ledger: PrivacyLedger) -> dict[str, int]:
    """Steps each client should have been charged: local steps × rounds it took part in."""
    settings = run.settings
    if ledger.unit == "client":
        rounds = int(settings.get("rounds", 0))
        return {cid: rounds for cid in ledger.clients}
    local_steps = int(settings.get("local_steps", 0))
    rounds = int(settings.get("rounds", 0))
    if float(settings.get("participation", 1.0)) >= 1.0:
        return {cid: local_steps * rounds for cid in ledger.clients}
    # Partial participation: the participants of every round are in metrics.jsonl.
    joined = {cid: 0 for cid in ledger.clients}
    for line in run.metrics:
        for cid in line.get("participants", []):
            if cid in joined:
                joined[cid] += 1
    return {cid: local_steps * n for cid, n in joined.items()}


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
    checks.extend(_config_checks(run, ledger))
    metadata = ledger.metadata
    summary = run.summary or {}
    privacy = summary.get("privacy") or {}
    claimed = {cid: float(v) for cid, v in (privacy.get("per_client_epsilon") or {}).items()}
    planned = _planned_steps(run, ledger)
    rows, federation = _client_rows(ledger, claimed, planned, eps_error)
    table = pd.DataFrame(rows)

    # Non-private releases make ε infinite.
    nonprivate = [r["client"] for r in rows if r["non_private"]]
    checks.append(("private releases only", not nonprivate,
                   "no non-private release" if not nonprivate else
                   f"NON-PRIVATE release (ε = ∞) on {nonprivate}"))
    # δ policy.
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
    # Steps charged versus the plan.
    off = {r["client"]: (r["steps"], r["planned_steps"]) for r in rows
           if r["planned_steps"] is not None and r["steps"] != r["planned_steps"]}
    checks.append(("steps match the plan", not off,
                   "every client charged rounds × local steps" if not off else
                   "charged ≠ planned (steps, planned): " + ", ".join(
                       f"{c} {s}≠{p}" for c, (s, p) in off.items())))
    checks.extend(_event_checks(run, ledger, rows))
    checks.append(_init_check(run, ledger))
    checks.append(_invariant_check(rows))
    checks.extend(_claim_checks(ledger, privacy, rows, federation))
    return _finish(path, checks, table, federation)


def _config_checks(run: RunDirectory, ledger: PrivacyLedger) -> list[Check]:
    checks: list[Check] = []
    settings = run.settings
    if not settings:
        return [("config", False, "config.json missing or empty")]
    recorded = (run.config or {}).get("digest")
    digest = _config_digest(settings)
    problems = []
    if recorded != digest:
        problems.append(f"config digest {str(recorded)[:12]}… ≠ recomputed {digest[:12]}…")
    provenance = run.provenance or {}
    if provenance.get("config_digest") != recorded:
        problems.append("provenance names another config digest")
    if settings.get("epsilon") != ledger.target_epsilon:
        problems.append(f"config ε target {settings.get('epsilon')} ≠ ledger's "
                        f"{ledger.target_epsilon}")
    if settings.get("dp_level", "example") != ledger.unit:
        problems.append(f"config dp_level {settings.get('dp_level')!r} ≠ ledger unit "
                        f"{ledger.unit!r}")
    meta_clip = ledger.metadata.get("max_grad_norm")
    if meta_clip is not None and settings.get("max_grad_norm") != meta_clip:
        problems.append(f"clip norm {settings.get('max_grad_norm')} ≠ ledger's {meta_clip}")
    checks.append(("config", not problems,
                   "digest, provenance and ledger agree" if not problems else
                   "; ".join(problems)))
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


def _event_checks(run: RunDirectory, ledger: PrivacyLedger,
                  rows: list[dict[str, Any]]) -> list[Check]:
    """σ and q of every step event against the run's σ, batch size and N_i."""
    if ledger.unit != "example":
        return []
    settings = run.settings
    sigma = ledger.metadata.get("noise_multiplier",
                                (run.progress or {}).get("noise_multiplier"))
    batch = settings.get("batch_size")
    problems = []
    for row in rows:
        if row["non_private"] or row["steps"] == 0:
            continue
        if sigma is not None and row["sigma"] is not None and not math.isclose(
                row["sigma"], sigma, rel_tol=1e-9):
            problems.append(f"{row['client']} σ {row['sigma']:.6g} ≠ run σ {sigma:.6g}")
        if batch and row["q"] is not None and not math.isclose(
                row["q"], batch / row["records"], rel_tol=1e-9):
            problems.append(f"{row['client']} q {row['q']:.6g} ≠ b/N = {batch}/{row['records']}")
    return [("step events match the run", not problems,
             "σ and q = b/N_i as configured" if not problems else "; ".join(problems))]


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


def _describe(releases: list[tuple[Any, int]]) -> str:
    if not releases:
        return "no init charge"
    return ", ".join(f"{count}× {event!r}" for event, count in releases)


def _dp_init_problem(cid: str, releases: list[tuple[Any, int]], *, rate: float,
                     sigma: float) -> str | None:
    """Why one client's charge is not the DP init's SGM(n_init/N_i, σ_init), or None."""
    if len(releases) == 1 and releases[0][1] == 1:
        event = releases[0][0]
        if (isinstance(event, PoissonSampledDpEvent)
                and isinstance(event.event, GaussianDpEvent)
                and math.isclose(event.sampling_probability, rate, rel_tol=1e-9)
                and math.isclose(event.event.noise_multiplier, sigma, rel_tol=1e-9)):
            return None
    if any(isinstance(e, GaussianDpEvent) for e, _ in releases):
        return (f"{cid}: OLD unsampled charge {_describe(releases)}: that init summed the "
                "first n_init records, whose sensitivity is 2·C_init, not the C_init charged — "
                "ε is understated; re-run with today's sampled DP init")
    if not releases or all(type(e).__name__ == "NoOpDpEvent" for e, _ in releases):
        return (f"{cid}: a data-dependent init (gradient-svd, source dp) with {_describe(releases)}"
                f"; expected 1× PoissonSampled(q={rate:.6g}, Gaussian(σ={sigma:g}))")
    return (f"{cid}: init charged {_describe(releases)}; expected 1× "
            f"PoissonSampled(q=n_init/N_i={rate:.6g}, Gaussian(σ_init={sigma:g}))")


def _init_check(run: RunDirectory, ledger: PrivacyLedger) -> Check:
    """The config's initialisation against the ledger's init events."""
    name = "init matches the ledger"
    settings = run.settings
    init = settings.get("init", "w0-svd")
    if init != "gradient-svd":
        return (name, True, f"init={init!r} reads no record")
    source = settings.get("init_source", "dp")
    releases = _init_releases(ledger)
    if source == "public":
        data = settings.get("init_data")
        reference = (ledger.metadata.get("init") or {}).get("data") or {}
        if not data:
            return (name, False,
                    "init_source='public' without an --init-data reference: the code that wrote "
                    "this run computed the 'public' init from the clients' own records and "
                    "charged nothing — those records have ε = ∞ for the init")
        if reference.get("source") != data or not reference.get("records_sha256"):
            return (name, False, f"init_data={data!r} but the ledger keeps no matching "
                                 f"reference with a digest ({reference or 'none'})")
        return (name, True, f"public init data {data!r} (records sha256 "
                            f"{reference['records_sha256'][:12]}…), no client charged")
    if ledger.unit != "example":
        return (name, False, f"gradient-svd init with source {source!r} reads client records "
                             f"(a record-level release) in a {ledger.unit}-level run")
    sigma = settings.get("init_noise_multiplier")
    if source == "nonprivate" or sigma == 0:
        bad = [cid for cid, r in releases.items()
               if not any(isinstance(e, NonPrivateDpEvent) for e, _ in r)]
        return (name, not bad, "non-private init charged as NonPrivate (ε = ∞) to every client"
                if not bad else f"non-private init not charged as NonPrivate to {bad}")
    examples = settings.get("init_examples")
    if not isinstance(examples, int) or sigma is None:
        return (name, False, "config lacks init_examples or init_noise_multiplier for the DP "
                             "init")
    problems = [p for cid in ledger.clients if (p := _dp_init_problem(
        cid, releases[cid], rate=examples / ledger.dataset_sizes[cid], sigma=float(sigma)))]
    return (name, not problems,
            f"every client charged PoissonSampled(q = {examples}/N_i, Gaussian(σ_init = "
            f"{sigma:g})) once" if not problems else "; ".join(problems))


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


def _claim_checks(ledger: PrivacyLedger, privacy: dict[str, Any], rows: list[dict[str, Any]],
                  federation: dict[str, float]) -> list[Check]:
    checks: list[Check] = []
    claimed = privacy.get("epsilon")
    accountant = privacy.get("accountant", "prv")
    key = {"prv": "prv_upper", "pld": "pld", "rdp": "rdp"}.get(accountant, "prv_upper")
    recomputed = federation.get(key, federation.get("pld"))
    if any(r["non_private"] for r in rows):
        recomputed = math.inf
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
    target = ledger.target_epsilon
    if target is not None and recomputed is not None:
        checks.append(("within target", _leq(recomputed, float(target)),
                       f"recomputed ε = {_fmt(recomputed)}, target {target}"))
    return checks


def _finish(path: str, checks: list[Check], table: Any, federation: dict[str, float],
            ) -> AuditReport:
    failed = [c for c in checks if not c[1]]
    if not failed:
        worst = federation.get("prv_upper", federation.get("pld"))
        verdict = (f"PASS: the ledger is intact and every check holds; the run is "
                   f"(ε = {_fmt(worst)}, δ)-DP per record as recomputed independently.")
    else:
        names = ", ".join(c[0] for c in failed)
        verdict = (f"FAIL ({len(failed)} of {len(checks)} checks): {names}. "
                   "Do not rely on the run's stated guarantee until these are explained.")
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
