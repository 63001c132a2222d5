"""The ``fedsb-dp`` command line: ``run``, ``account``, ``calibrate``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from fedsb_dp import __version__
from fedsb_dp.console import quiet_expected_warnings, show_narration
from fedsb_dp.errors import FedSBError, SettingError, SettingsConflict
from fedsb_dp.run_flags import add_run_flags, describe_error, values_from_args


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="private federated Fed-SB fine-tuning",
        usage="%(prog)s [--config FILE] [--resume DIR] [--engine ENGINE] [SETTINGS ...]",
        description="Run private federated Fed-SB fine-tuning (defaults: MiniLM, Rotten "
                    "Tomatoes, 3 IID clients, offline).")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file of run settings (flags override it)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    parser.add_argument("--export-merged", action="store_true", help="also save a merged model")
    parser.add_argument("--export-peft", action="store_true", help="also save a PEFT adapter")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--engine", choices=("inprocess", "flower-sim"), default="inprocess",
                        help="inprocess (default) or flower-sim: the Flower app on Flower's "
                        "simulation engine (needs the 'flower' extra; see docs/distributed.md)")
    add_run_flags(parser)
    parser.set_defaults(func=_run)


def _run_config(args: argparse.Namespace):
    from fedsb_dp.federated.run_config import RunConfig

    values = values_from_args(args)
    if args.config:
        return RunConfig.from_toml(args.config, **values)
    return RunConfig.from_dict(values)


def _format_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _print_summary(result) -> None:
    s = result.summary
    privacy = s["privacy"]
    print()
    print(f"Run {result.status}: {result.run_dir}")
    print(f"  method          {s.get('method', 'fedsb')}, partition {s.get('partition', 'iid')}")
    if s.get("message"):
        print(f"  note: {s['message']}")
    if "test_macro_f1" in s:
        print(f"  test accuracy   {s['test_accuracy']:.4f}   macro-F1 {s['test_macro_f1']:.4f}"
              f"   ({s['test_examples']} held-out examples)")
    else:  # causal LM: response loss and perplexity, exact-match on a label task
        match = (f"exact-match {s['test_accuracy']:.4f}   "
                 if s.get("test_accuracy") is not None else "")
        print(f"  test            {match}response loss {s['test_loss']:.4f}   perplexity "
              f"{s['test_perplexity']:.4g}   ({s['test_examples']} held-out examples)")
    if math.isinf(privacy["epsilon"]):
        print("  privacy         NONE: ε = ∞ (non-private run or non-private release)")
    else:
        unit = "client" if s.get("privacy_unit") == "client" else "record"
        print(f"  privacy         (ε = {privacy['epsilon']:.4f}, δ = {privacy['delta']:.1e})-DP "
              f"per {unit}, {privacy['accountant'].upper()} upper bound"
              + (f" [lower {privacy['epsilon_lower']:.4f}, estimate "
                 f"{privacy['epsilon_estimate']:.4f}]" if privacy.get("epsilon_lower") else "")
              + f"; target ε = {s['target_epsilon']}")
        if privacy.get("fallback_reason"):
            print(f"                  ({privacy['fallback_reason']})")
        per_client = ", ".join(f"{cid} {eps:.4f}"
                               for cid, eps in privacy["per_client_epsilon"].items())
        print(f"  per-client ε    {per_client}")
        noise_name = "noise z (server)" if unit == "client" else "noise σ"
        if s.get("noise_multipliers"):
            print(f"  {'noise σᵢ':15s} " + ", ".join(
                f"{cid} {sigma:.4f}" for cid, sigma in s["noise_multipliers"].items()))
        else:
            # At least one space after the label, even one longer than the column.
            print(f"  {noise_name.ljust(15)} {s['noise_multiplier']:.4f}")
    print(f"  rounds          {s['rounds_completed']}/{s['rounds_planned']}")
    print(f"  communicated    setup {_format_bytes(s['bytes_setup'])}, uplink "
          f"{_format_bytes(s['bytes_up'])}, downlink {_format_bytes(s['bytes_down'])} "
          f"({s['trainable_parameters']:,} trainable parameters)")
    if s["seed_mode"] == "seeded":
        print("  seeded run: reproducible, so its noise is NOT a private release")
    if s.get("trust_model"):
        print(f"  trusted         {s['trust_model']['trusted']}")
    # Timings are operator-only (they track realised batch sizes), shown here, never published.
    wall = result.operator.get("wall_time_s", s.get("wall_time_s"))
    if wall is not None:
        print(f"  wall time       {wall:.0f} s (operator-only, not in summary.json)")


def _run_flower_sim(args: argparse.Namespace) -> int:
    if args.export_merged or args.export_peft:
        raise FedSBError("--engine flower-sim does not support --export-merged/--export-peft; "
                         "use --engine inprocess for those")
    try:
        from fedsb_dp.flower.simulation import run_flower_simulation
    except ImportError as exc:
        raise FedSBError(f"--engine flower-sim needs the 'flower' extra ({exc}); install it "
                         "with: pip install -e '.[flower]'") from exc
    if args.resume:
        result = run_flower_simulation(resume=args.resume)
    else:
        result = run_flower_simulation(_run_config(args))
    _print_summary(result)
    return 0 if result.status == "completed" else 1


def _run(args: argparse.Namespace) -> int:
    from fedsb_dp.federated.inprocess import run_federation
    from fedsb_dp.federated.run_config import RunConfig

    if args.engine == "flower-sim":
        return _run_flower_sim(args)
    if args.resume:
        config = RunConfig.from_dict({"no_dp": True, "out": args.resume})  # replaced on load
        result = run_federation(config, resume=True, export_merged=args.export_merged,
                                export_peft=args.export_peft, progress=not args.no_progress)
    else:
        result = run_federation(_run_config(args), export_merged=args.export_merged,
                                export_peft=args.export_peft, progress=not args.no_progress)
    _print_summary(result)
    return 0 if result.status == "completed" else 1


def _add_audit(subparsers: argparse._SubParsersAction) -> None:
    from fedsb_dp.audit.command import add_arguments

    add_arguments(subparsers.add_parser(
        "audit", help="audit a run directory: ledger, ε recomputation, flags (exit 1 on failure)"))


def build_parser() -> argparse.ArgumentParser:
    """The ``fedsb-dp`` argument parser."""
    from accounting.cli import register

    parser = argparse.ArgumentParser(
        prog="fedsb-dp",
        description="Differentially private federated fine-tuning with Fed-SB.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no status or per-round lines on stderr (results still on stdout)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    register(subparsers)
    _add_audit(subparsers)
    from fedsb_dp.comm import register as register_comm

    register_comm(subparsers)
    from fedsb_dp.sweep.command import register as register_sweep

    register_sweep(subparsers)
    from fedsb_dp.use.command import register as register_use

    register_use(subparsers)
    for subparser in subparsers.choices.values():
        # Also after the subcommand (`fedsb-dp run ... -v`); SUPPRESS keeps a -v given
        # before the subcommand from being reset by the subparser's default.
        subparser.add_argument("-v", "--verbose", action="store_true",
                               default=argparse.SUPPRESS, help="log progress details")
        subparser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                               help="no status or per-round lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsb-dp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_expected_warnings(transformers_reports=not args.verbose)
    # Status and per-round lines go to stderr with the progress bars; stdout keeps results.
    show_narration(not args.quiet)
    try:
        return int(args.func(args) or 0)
    except (SettingError, SettingsConflict) as exc:
        print(f"fedsb-dp: error: {describe_error(exc, args)}", file=sys.stderr)
        return 2
    except (FedSBError, ValueError) as exc:
        print(f"fedsb-dp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
