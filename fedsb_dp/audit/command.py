"""``fedsb-dp audit RUN_DIR [--empirical]``: print the audit; exit 1 when a check fails."""

from __future__ import annotations

import argparse

EXIT_FAILED = 1


def audit_command(args: argparse.Namespace) -> int:
    """Audit a run or sweep directory; with ``--empirical`` also audit the run's DP step.

    The empirical part runs the step-level audit of the client's clip + noise step at the run's
    σ and clip norm (q = 1, 1e5 draws per world), with the records' gradients from the run's
    own task loss (a classifier's, or a causal LM's response-token loss): it checks the code
    that produced the run, not the run's records. It audits the record-level step only, so it
    is refused for a client-level run (whose mechanism is the server's clip of ΔRᵢ and noise
    on their sum).

    Returns:
        0 when every check passes, 1 otherwise (2 for unreadable input, via the caller).

    Raises:
        ConfigError: ``--empirical`` on a client-level run, or on a run whose task is unknown
            (before anything is printed).
    """
    from accounting.audit import audit_sweep, is_run_dir

    task = None
    if args.empirical and is_run_dir(args.run_dir):
        _refuse_client_level(args.run_dir)
        task = _run_task(args.run_dir)  # before anything is printed
    report = audit_sweep(args.run_dir)
    print(report.format())
    passed = report.passed
    if args.empirical:
        from accounting.ledger import PrivacyLedger
        from fedsb_dp.audit.step import step_audit

        if not is_run_dir(args.run_dir):
            print("--empirical audits one run directory; skipped for a sweep")
            return 0 if passed else EXIT_FAILED
        metadata = PrivacyLedger.load(f"{args.run_dir}/ledger.json").metadata
        # With per-client noise the weakest release is the smallest σᵢ: audit that one.
        sigma = float(min((metadata.get("noise_multipliers") or {}).values(),
                          default=metadata.get("noise_multiplier") or 0.0))
        if sigma <= 0:
            print("empirical step audit: skipped, the run added no noise (σ = 0, ε = ∞)")
            return EXIT_FAILED
        result = step_audit(sigma, max_grad_norm=float(metadata.get("max_grad_norm", 1.0)),
                            draws=args.draws, delta=args.delta, task=task)
        ok = not result.flagged
        print(f"  [{'ok' if ok else 'FAIL'}] empirical step audit ({result.task} loss, "
              f"σ = {sigma:.4f}, q = 1, "
              f"{result.draws:,} draws per world): μ̂ = {result.mu_hat:.4f} (1/σ = "
              f"{result.mu_true:.4f}), ε lower bound {result.epsilon_lower:.4f} vs claimed "
              f"{result.epsilon_claimed:.4f} at δ = {result.delta:g}")
        passed = passed and ok
    return 0 if passed else EXIT_FAILED


def _run_task(run_dir: str) -> str:
    """The run's task from its ``config.json`` (runs written before the setting: classification).

    Raises:
        ConfigError: For a task this toolkit does not know (the audit would test another loss).
    """
    import json
    import os

    from fedsb_dp.errors import ConfigError
    from fedsb_dp.models import SEQUENCE_CLASSIFICATION, TASKS

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return SEQUENCE_CLASSIFICATION
    with open(path, encoding="utf-8") as fh:
        task = json.load(fh).get("config", {}).get("task", SEQUENCE_CLASSIFICATION)
    if task not in TASKS:
        raise ConfigError(f"{path}: task={task!r} is not one of {TASKS}; the empirical audit "
                          "needs the run's per-example loss")
    return task


def _refuse_client_level(run_dir: str) -> None:
    """Raise when the run's privacy unit is a client: the step audit would test another step.

    Client-level runs train without local noise; their clients' DP-SGD step has σ = 0 by design
    and the run's σ is the server's multiplier z on the clipped sum of ΔRᵢ, so auditing the
    record-level step at that σ would report on a mechanism the run never used.
    """
    from accounting.ledger import PrivacyLedger
    from fedsb_dp.errors import ConfigError

    ledger = PrivacyLedger.load(f"{run_dir}/ledger.json")
    level = ledger.metadata.get("dp_level", ledger.unit)
    if ledger.unit == "client" or level == "client":
        raise ConfigError(
            f"--empirical audits the record-level DP-SGD step, but {run_dir} is a client-level "
            f"run (ledger unit {ledger.unit!r}, dp_level {level!r}) whose mechanism is the "
            "server's clip of each ΔRᵢ and noise on their sum; run `fedsb-dp audit` without "
            "--empirical (the re-accounting covers client-level ledgers)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``audit`` subcommand's arguments."""
    parser.add_argument("run_dir", help="run directory (or a directory of run directories)")
    parser.add_argument("--empirical", action="store_true",
                        help="also run the step-level empirical audit of the DP step at the "
                             "run's σ and clip norm (a few seconds)")
    parser.add_argument("--draws", type=int, default=100_000,
                        help="releases per world for --empirical (default 100000)")
    parser.add_argument("--delta", type=float, default=1e-5,
                        help="δ at which --empirical compares ε (default 1e-5)")
    parser.set_defaults(func=audit_command)
