"""``fedsb-dp export``, ``fedsb-dp predict`` and ``fedsb-dp generate``."""

from __future__ import annotations

import argparse
import os
import sys

from fedsb_dp.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the three subcommands to the ``fedsb-dp`` parser."""
    export = subparsers.add_parser(
        "export", help="save a run's trained model as a PEFT adapter, merged model or "
        "fedsb-dp adapter",
        description="Export the trained model of a run directory (its final adapter, or the "
                    "last completed round of an unfinished run), with an export.json that "
                    "records the run, method, ε and δ (recomputed from the ledger).")
    export.add_argument("run", metavar="RUN", help="run directory")
    export.add_argument("--format", required=True, choices=("peft", "merged", "sb"),
                        help="peft: PEFT LoRA adapter; merged: plain transformers model; sb: "
                        "fedsb-dp's own adapter")
    export.add_argument("--out", metavar="DIR", help="output directory (default: "
                        "RUN/export-FORMAT)")
    export.add_argument("--force", action="store_true",
                        help="replace a non-empty output directory")
    export.set_defaults(func=_export)

    predict = subparsers.add_parser(
        "predict", help="classify texts with a run's trained model",
        description="Classify texts with a run's trained classifier: the label by name and "
                    "every class probability, as CSV.")
    predict.add_argument("run", metavar="RUN", help="run directory")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", metavar="TEXT", help="a text (repeatable)")
    source.add_argument("--input", metavar="FILE", help="CSV, TSV, JSON Lines or Parquet file")
    predict.add_argument("--text-column", metavar="C",
                         help="column of --input to classify (default: the run's text column)")
    predict.add_argument("--text-pair", action="append", metavar="TEXT",
                         help="the second text of a text-pair example, once per --text "
                              "(text-pair runs)")
    predict.add_argument("--text-pair-column", metavar="C",
                         help="column of --input with the second texts (default: the run's "
                              "text-pair column)")
    predict.add_argument("--output", metavar="FILE",
                         help="write the predictions CSV here (default: standard output)")
    predict.add_argument("--force", action="store_true", help="replace an existing --output")
    predict.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    predict.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's)")
    predict.set_defaults(func=_predict)

    generate = subparsers.add_parser(
        "generate", help="continue prompts with a run's trained causal LM",
        description="Continue prompts with a causal-LM run's trained model: greedy unless "
                    "--temperature > 0. Prompts are used as given unless --template wraps "
                    "them in the run's label-task prompt (e.g. 'Review: …\\nSentiment:').")
    generate.add_argument("run", metavar="RUN", help="run directory")
    generate.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                          help="a prompt (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                          help="tokens to generate at most (default 32)")
    generate.add_argument("--template", action="store_true",
                          help="wrap each prompt in the run's label-task prompt template")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 (default): greedy; > 0: sample at this temperature")
    generate.add_argument("--seed", type=int, help="seed of the sampling")
    generate.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's)")
    generate.set_defaults(func=_generate)


def _check_device(device: str | None) -> None:
    if device is not None:
        from fedsb_dp.devices import check_device_name

        check_device_name(device)  # its SettingError names the flag


def _export(args: argparse.Namespace) -> int:
    from fedsb_dp.runs import load_run
    from fedsb_dp.use.export import EXPORT_JSON, export_run

    run = load_run(args.run)
    out = args.out or os.path.join(args.run, f"export-{args.format}")
    export_run(run, out, args.format, force=args.force)
    import json

    with open(os.path.join(out, EXPORT_JSON), encoding="utf-8") as fh:
        record = json.load(fh)
    privacy = (f"(ε = {record['epsilon']:.4f}, δ = {record['delta']:.1e})-DP per "
               f"{record['privacy_unit']}" if record["private"] else "NOT private (ε = ∞)")
    print(f"Exported {run.config.method} run {record['run_id']} as {args.format}: {out}")
    print(f"  layout   {record['layout']}")
    print(f"  privacy  {privacy}, recomputed from the ledger")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedsb_dp.runs import load_run
    from fedsb_dp.use.predict import check_predictable, predict_texts, read_texts

    _check_device(args.device)
    if args.output and os.path.exists(args.output) and not args.force:
        raise ConfigError(f"--output {args.output!r} exists; choose another file or add "
                          "--force to replace it")
    run = load_run(args.run)
    for flag, value in (("--text-column", args.text_column),
                        ("--text-pair-column", args.text_pair_column)):
        if value and not args.input:
            raise ConfigError(f"{flag} needs --input FILE")
    if args.text_pair and not args.text:
        raise ConfigError("--text-pair goes with --text (for --input, use --text-pair-column)")
    texts = args.text or read_texts(args.input, args.text_column or run.config.text_column)
    pairs = args.text_pair
    pair_column = args.text_pair_column or (run.config.text_pair_column if args.input else None)
    if args.input and pair_column:
        pairs = read_texts(args.input, pair_column, flag="--text-pair-column")
    check_predictable(run, texts, batch_size=args.batch_size, pairs=pairs)
    frame = predict_texts(run.load_model(device=args.device), texts,
                          batch_size=args.batch_size, max_length=run.config.max_length,
                          pairs=pairs)
    if args.output:
        tmp = f"{args.output}.tmp-{os.getpid()}"
        frame.to_csv(tmp, index=False)
        os.replace(tmp, args.output)
        print(f"{len(frame)} predictions written to {args.output}")
    else:
        frame.to_csv(sys.stdout, index=False)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedsb_dp.runs import load_run
    from fedsb_dp.use.generate import check_generation, generate_texts, prompt_texts

    _check_device(args.device)
    run = load_run(args.run)
    check_generation(run, args.prompt, max_new_tokens=args.max_new_tokens,
                     template=args.template, temperature=args.temperature)
    texts = generate_texts(run.load_model(device=args.device),
                           prompt_texts(run, args.prompt, args.template),
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           seed=args.seed)
    for prompt, text in zip(args.prompt, texts, strict=True):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text)
    return 0
