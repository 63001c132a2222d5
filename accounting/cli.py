"""``account`` and ``calibrate`` subcommands (also ``python -m accounting``).

Exit codes: 0 within budget / success, 2 bad input or a ledger that fails its integrity check,
3 a ledger whose ε is above its own target.
"""

from __future__ import annotations

import argparse
import math
import sys

from accounting.accountants import ACCOUNTANTS, compute_epsilon, federation_epsilon
from accounting.calibration import FederatedPlan, calibrate_noise_multiplier
from accounting.errors import AccountingError
from accounting.ledger import PrivacyLedger

EXIT_OVER_BUDGET = 3


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _account(args: argparse.Namespace) -> int:
    ledger = PrivacyLedger.load(args.ledger)
    delta = args.delta if args.delta is not None else ledger.target_delta
    names = ACCOUNTANTS if args.accountant == "all" else (args.accountant,)
    print(f"ledger {args.ledger}: unit={ledger.unit}, {len(ledger.clients)} clients, "
          f"N_total={ledger.n_total}, δ={delta:g}, target ε={ledger.target_epsilon}")
    if ledger.large_delta:
        print("  WARNING: δ ≥ 1/N_total was accepted by override")
    if ledger.pending:
        print(f"  {len(ledger.pending)} reservation(s) not committed (counted as spent)")
    seed_mode = ledger.metadata.get("seed_mode")
    if seed_mode == "seeded":
        print("  WARNING: seeded run: its noise is reproducible and NOT a private release")
    headline = None
    for name in names:
        result = federation_epsilon(ledger, delta=delta, accountant=name)
        print(f"\n[{name}]  federation ε = {_fmt(result.epsilon)}  (worst: {result.worst_client})")
        print(f"  {'client':16s} {'records':>8s} {'steps':>8s} {'lower':>9s} {'estimate':>9s} "
              f"{'epsilon':>9s}  accountant")
        for cid, r in result.per_client.items():
            print(f"  {cid:16s} {ledger.dataset_sizes[cid]:8d} {ledger.steps(cid):8d} "
                  f"{_fmt(r.lower):>9s} {_fmt(r.estimate):>9s} {_fmt(r.epsilon):>9s}  "
                  f"{r.accountant}" + (f" ({r.fallback_reason})" if r.fallback_reason else ""))
        headline = headline if headline is not None else result.epsilon
    target = ledger.target_epsilon
    if target is not None and headline is not None and headline > target:
        print(f"\nABOVE TARGET: ε = {_fmt(headline)} > {target}")
        return EXIT_OVER_BUDGET
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    rates = [float(x) for x in str(args.sampling_rate).split(",")]
    if len(rates) == 1:
        rates = rates * args.clients
    if len(rates) != args.clients:
        raise AccountingError(
            f"--sampling-rate gives {len(rates)} rates for --clients {args.clients}")
    plan = FederatedPlan(
        sampling_probabilities={f"client-{i}": q for i, q in enumerate(rates)},
        local_steps=args.local_steps, rounds=args.rounds)
    result = calibrate_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta,
                                        plan=plan, accountant=args.accountant)
    sigma = result.noise_multiplier
    print(f"σ = {sigma:.4f} for ε ≤ {args.epsilon}, δ = {args.delta:g} ({args.clients} clients × "
          f"{args.rounds} rounds × {args.local_steps} local steps; calibrated with "
          f"{result.accountant})")
    for name in ACCOUNTANTS:
        worst = max((compute_epsilon(plan.client_event(cid, sigma), delta=args.delta,
                                     accountant=name) for cid in plan.sampling_probabilities),
                    key=lambda r: r.epsilon)
        print(f"  {name}: ε = {_fmt(worst.epsilon)}" + (
            f"  [lower {_fmt(worst.lower)}, estimate {_fmt(worst.estimate)}]"
            if worst.lower is not None else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``account`` and ``calibrate`` to an argparse subparsers object."""
    account = subparsers.add_parser("account", help="recompute ε from a ledger")
    account.add_argument("ledger", help="path to ledger.json")
    account.add_argument("--delta", type=float, default=None, help="δ (default: the ledger's)")
    account.add_argument("--accountant", choices=(*ACCOUNTANTS, "all"), default="all")
    account.set_defaults(func=_account)
    calibrate = subparsers.add_parser("calibrate", help="σ for a whole planned run")
    calibrate.add_argument("--epsilon", type=float, required=True)
    calibrate.add_argument("--delta", type=float, required=True)
    calibrate.add_argument("--clients", type=int, required=True)
    calibrate.add_argument("--rounds", type=int, required=True)
    calibrate.add_argument("--local-steps", type=int, required=True)
    calibrate.add_argument("--sampling-rate", required=True,
                           help="q, or a comma-separated q per client")
    calibrate.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    calibrate.set_defaults(func=_calibrate)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m accounting {account,calibrate} ...``."""
    parser = argparse.ArgumentParser(prog="python -m accounting")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AccountingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
