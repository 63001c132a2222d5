"""The ``fedsb-dp`` command line: ``run``, ``account``, ``calibrate``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.errors import FedSBError

# Flag → (RunConfig field, type, help). Defaults come from RunConfig itself.
_RUN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--epsilon", "epsilon", float, "privacy target ε for the whole run (required unless --no-dp)"),
    ("--delta", "delta", float, "δ (default: well below 1/N_total)"),
    ("--accountant", "accountant", str, "prv (default), pld or rdp"),
    ("--clip", "max_grad_norm", float, "per-example clip norm C"),
    ("--dp-level", "dp_level", str, "example (record-level, default) or client (whole clients: "
     "server clips each update and adds noise; needs many clients)"),
    ("--client-clip", "client_clip_norm", float, "client-level: clip norm S of one update"),
    ("--method", "method", str, "fedsb (default), fedit, ffa-lora, fedex-lora, flora, "
     "central-lora or central-sb (pooled-data references)"),
    ("--partition", "partition", str, "iid (default), dirichlet:<alpha> (label skew) or "
     "quantity:<beta> (size skew)"),
    ("--model", "model", str,
     "hub id, local directory, 'minilm' (offline default) or 'mpnet' (offline, opt-in install)"),
    ("--rank", "rank", int, "r, side of the trained r×r matrix (LoRA baselines: LoRA rank)"),
    ("--lora-scaling", "lora_scaling", float, "s = alpha / r of the LoRA baselines"),
    ("--pooling", "pooling", str, "what the classifier reads: auto (default: mean for "
     "sentence-transformers checkpoints), cls or mean"),
    ("--init", "init", str, "w0-svd (default), random-orthonormal or gradient-svd"),
    ("--init-source", "init_source", str, "gradient-svd data: dp (default), public "
     "(needs --init-data), nonprivate"),
    ("--init-examples", "init_examples", int, "gradient-svd: expected records per client "
     "(source dp: each record sampled with probability this / N_i) or public records used"),
    ("--init-data", "init_data", str, "public dataset for --init-source public (file or hub "
     "id; never the training data)"),
    ("--init-text-column", "init_text_column", str, "text column of --init-data"),
    ("--init-text-pair-column", "init_text_pair_column", str, "second text column of "
     "--init-data"),
    ("--init-label-column", "init_label_column", str, "label column of --init-data"),
    ("--init-noise-multiplier", "init_noise_multiplier", float, "σ_init for --init-source dp"),
    ("--init-clip", "init_clip_norm", float, "C_init for --init-source dp"),
    ("--dataset", "dataset", str, "'rotten-tomatoes' (offline), a CSV/JSON/Parquet file, or a "
     "hub dataset name"),
    ("--text-column", "text_column", str, "text column"),
    ("--text-pair-column", "text_pair_column", str, "second text column (NLI pairs)"),
    ("--label-column", "label_column", str, "label column"),
    ("--max-length", "max_length", int, "tokens per example"),
    ("--max-train-records", "max_train_records", int, "use only this many training records"),
    ("--max-eval-records", "max_eval_records", int, "evaluate on at most this many records"),
    ("--clients", "clients", int, "number of clients"),
    ("--rounds", "rounds", int, "federated rounds"),
    ("--local-steps", "local_steps", int, "DP-SGD steps per client per round"),
    ("--batch-size", "batch_size", int, "expected (Poisson) batch size"),
    ("--max-physical-batch-size", "max_physical_batch_size", int, "memory cap per chunk"),
    ("--lr", "learning_rate", float, "AdamW learning rate (default: the method's tuned one)"),
    ("--optimizer", "optimizer", str, "adamw (default) or sgd"),
    ("--participation", "participation", float, "fraction of clients per round"),
    ("--min-clients", "min_clients", int, "fewest clients in a round"),
    ("--seed", "seed", int, "root seed: reproducible run, DP noise then NOT a private release"),
    ("--out", "out", str, "run directory (default: runs/run-<timestamp>)"),
]
_RUN_SWITCHES: list[tuple[str, str, str]] = [
    ("--no-dp", "no_dp", "train without differential privacy (ε = ∞)"),
    ("--allow-large-delta", "allow_large_delta", "accept δ ≥ 1/N (flagged in every report)"),
    ("--allow-nonprivate-init", "allow_nonprivate_init", "permit --init-source nonprivate"),
    ("--frozen-head", "train_head", "do not train the classification head"),
    ("--train-pooler", "train_pooler", "also train a BERT-style pooler with the head (noised "
     "and communicated like R)"),
    ("--no-model-dropout", "model_dropout", "switch off the base model's dropout"),
]


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="private federated Fed-SB fine-tuning",
        description="Run private federated Fed-SB fine-tuning (defaults: MiniLM, Rotten "
                    "Tomatoes, 3 IID clients, offline).")
    parser.add_argument("--config", help="TOML file with run settings (flags override it)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    parser.add_argument("--targets", help="comma-separated target modules (default per model)")
    parser.add_argument("--client-ranks", help="Fed-SB with rank-heterogeneous clients: one "
                        "rank ≤ --rank per client, comma-separated")
    parser.add_argument("--export-merged", action="store_true", help="also save a merged model")
    parser.add_argument("--export-peft", action="store_true", help="also save a PEFT adapter")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--engine", choices=("inprocess", "flower-sim"), default="inprocess",
                        help="inprocess (default) or flower-sim: the Flower app on Flower's "
                        "simulation engine (needs the 'flower' extra; see docs/distributed.md)")
    for flag, dest, kind, text in _RUN_FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    for flag, dest, text in _RUN_SWITCHES:
        parser.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
    parser.set_defaults(func=_run)


def _run_config(args: argparse.Namespace):
    from fedsb_dp.federated.run_config import RunConfig

    values: dict[str, Any] = {}
    for _, dest, _, _ in _RUN_FLAGS:
        if getattr(args, dest) is not None:
            values[dest] = getattr(args, dest)
    for _, dest, _ in _RUN_SWITCHES:
        if getattr(args, dest):
            # Switches named after what they turn off store the negation.
            values[dest] = dest not in ("train_head", "model_dropout")
    if args.targets:
        values["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.client_ranks:
        try:
            values["client_ranks"] = tuple(int(r) for r in args.client_ranks.split(","))
        except ValueError:
            raise ValueError(f"--client-ranks {args.client_ranks!r} must be comma-separated "
                             "integers, one per client") from None
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
    print(f"  test accuracy   {s['test_accuracy']:.4f}   macro-F1 {s['test_macro_f1']:.4f}"
          f"   ({s['test_examples']} held-out examples)")
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
        print(f"  {noise_name:15s} {s['noise_multiplier']:.4f}")
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
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    register(subparsers)
    _add_audit(subparsers)
    from fedsb_dp.comm import register as register_comm

    register_comm(subparsers)
    from fedsb_dp.sweep.command import register as register_sweep

    register_sweep(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsb-dp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_expected_warnings(transformers_reports=not args.verbose)
    try:
        return int(args.func(args) or 0)
    except (FedSBError, ValueError) as exc:
        print(f"fedsb-dp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
