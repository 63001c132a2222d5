"""``fedsb-dp sweep``, ``fedsb-dp report`` and ``fedsb-dp archive``."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.settings import by_name, parse_text
from fedsb_dp.sweep.spec import SweepSpec


def _list(text: str | None, kind=str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{text!r} must be a comma-separated list") from None


def set_values(items: list[str]) -> dict[str, Any]:
    """The run settings of ``--set KEY=VALUE`` items, by field name.

    Keys are the :class:`RunConfig` field names (``-`` may stand for ``_``); each value is
    read by its setting's own parser, as ``fedsb-dp run`` reads the flag's argument.

    Raises:
        ConfigError: An item without ``=``, an unknown key (the message lists the known
            ones) or a value of the wrong type.

    """
    known = by_name(RunConfig)
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like key=value")
        if name not in known:
            raise ConfigError(f"--set {key.strip()!r} is not a run setting; known: "
                              f"{sorted(known)}")
        value = parse_text(known[name], text, shown=f"--set {name}")
        # A list is stored as a list so the spec's JSON form reads back equal.
        values[name] = list(value) if isinstance(value, tuple) else value
    return values


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """A spec from ``--spec`` (TOML) overridden by the list flags."""
    data = SweepSpec.from_toml(args.spec).to_dict() if args.spec else {}
    for name, kind in (("epsilons", str), ("methods", str), ("partitions", str),
                       ("seeds", int)):
        values = _list(getattr(args, name), kind)
        if values is not None:
            data[name] = values
    if args.ranks is not None:
        data["ranks"] = {"default": _list(args.ranks, int)}
    if args.fedsb_ranks is not None:
        data.setdefault("ranks", {})["fedsb"] = _list(args.fedsb_ranks, int)
    data["base"] = {**data.get("base", {}), **set_values(args.set or [])}
    return SweepSpec.from_dict(data)


def _sweep(args: argparse.Namespace) -> int:
    from fedsb_dp.sweep.plan import (
        estimate_s,
        format_duration,
        is_done,
        measured_speed,
        plan_lines,
        wall_time,
    )
    from fedsb_dp.sweep.report import write_report
    from fedsb_dp.sweep.results import unfinished_cells
    from fedsb_dp.sweep.runner import cell_dir, check_sweep_dir, run_sweep

    spec = spec_from_args(args)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be ≥ 1")
    check_sweep_dir(spec, args.out)  # a refused directory fails before the plan is shown
    for line in plan_lines(spec, args.out, workers=args.workers):
        print(line)
    if args.dry_run:
        return 0
    cells = spec.cells()
    left = [c for c in cells if not os.path.exists(os.path.join(cell_dir(args.out, c),
                                                                "summary.json"))]
    timed: dict = {}

    def report(cell, status):
        eps = "∞" if math.isinf(cell.epsilon) else f"{cell.epsilon:g}"
        print(f"  {status:14s} ε={eps:4s} {cell.method:12s} r={cell.rank:<3d} "
              f"{cell.partition:14s} seed={cell.seed}", flush=True)
        if cell in left:
            left.remove(cell)
        seconds = wall_time(cell_dir(args.out, cell)) if status != "skipped" else None
        if seconds is not None and not timed and left:
            # The first cell run here gives this machine's speed: say what remains.
            timed[cell] = seconds
            speed = measured_speed(spec, timed)
            print(f"  first cell took {format_duration(seconds)}; the {len(left)} left ≈ "
                  f"{format_duration(estimate_s(spec, left, speed, args.workers))} "
                  f"({speed.basis})", flush=True)

    statuses = run_sweep(spec, args.out, progress=not args.no_progress, on_cell=report,
                         workers=args.workers)
    if not any(is_done(cell_dir(args.out, c)) for c in cells):
        # Nothing to tabulate; say why each cell did not run instead of "no finished run".
        for cell in unfinished_cells(args.out):
            print(f"  {cell['run']}: {cell['error']}")
        print(f"no cell of {args.out!r} finished: no report")
        return 1
    outputs = write_report(args.out)
    print(f"report: {outputs['markdown']} and {outputs['html']}")
    return 1 if any(s == "failed" for s in statuses.values()) else 0


def _report(args: argparse.Namespace) -> int:
    from fedsb_dp.sweep.report import write_report

    outputs = write_report(args.path, merge=args.merge or ())
    for name, path in outputs.items():
        print(f"{name:24s} {path}")
    return 0


def _archive(args: argparse.Namespace) -> int:
    from fedsb_dp.sweep.archive import archive_runs
    from fedsb_dp.sweep.results import unfinished_cells

    cells = archive_runs(args.source, args.dest)
    print(f"archived {len(cells)} run(s) → {args.dest}/cells (config, ledger, metrics, "
          "provenance, summary; no weights, no partition counts)")
    refused = unfinished_cells(args.source)
    if refused:
        print(f"and the error record of {len(refused)} cell(s) that did not run")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep``, ``report`` and ``archive`` to a CLI."""
    parser = subparsers.add_parser(
        "sweep", help="privacy-utility grid: ε × method × rank × partition × seed",
        description="Run a resumable grid of federated runs (one run directory per cell) and "
                    "write results.csv, report.md and report.html.")
    parser.add_argument("--spec", help="TOML sweep specification (flags override it)")
    parser.add_argument("--out", required=True,
                        help="sweep directory (rerun to resume; rerun with more ε, methods, "
                             "ranks, partitions or seeds and the same settings to extend it)")
    parser.add_argument("--epsilons", help="e.g. 1,3,8,inf")
    parser.add_argument("--methods",
                        help="e.g. fedsb,ffa-lora,fedit,fedex-lora,flora,fedsvd,rolora")
    parser.add_argument("--ranks", help="ranks of every method, e.g. 16,32")
    parser.add_argument("--fedsb-ranks", help="Fed-SB's own ranks, e.g. 16,32,64")
    parser.add_argument("--partitions", help="e.g. iid,dirichlet:0.3")
    parser.add_argument("--seeds", help="e.g. 0,1,2")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a run setting shared by every cell (repeatable): KEY is its name "
                             "as in 'fedsb-dp run --help' without '--' (max-grad-norm=1, "
                             "targets=query,value)")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at once in separate processes, sharing the cores "
                             "(default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cells (and how many are done) and the time estimate, "
                             "then exit without running or writing anything")
    parser.set_defaults(func=_sweep)
    report = subparsers.add_parser(
        "report", help="regenerate a report from run or sweep directories",
        description="Recompute ε from every ledger and write results.csv, plots, report.md "
                    "and report.html.")
    report.add_argument("path", help="a sweep directory, a directory of runs, one run, or an "
                                     "archive (fedsb-dp archive)")
    report.add_argument("--merge", action="append", metavar="RESULTS_CSV",
                        help="an earlier results.csv whose rows join the report as written, "
                             "counted apart (repeatable)")
    report.set_defaults(func=_report)
    archive = subparsers.add_parser(
        "archive", help="copy the audit files of finished runs, without weights",
        description="Copy config, ledger, metrics, provenance and summary of every finished "
                    "run under SOURCE to DEST/cells/<run>/, enough for fedsb-dp report to "
                    "recompute every ε; weights and per-client label counts stay behind.")
    archive.add_argument("source", help="a sweep directory, a directory of runs, or one run")
    archive.add_argument("dest", help="the archive directory")
    archive.set_defaults(func=_archive)
