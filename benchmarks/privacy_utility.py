"""Privacy-utility benchmark: a sweep on the default model and data, then its report.

A thin driver over ``fedsb-dp sweep`` (the same code users run) with a checked-in grid,
``benchmarks/privacy_utility.toml``; prints the aggregated table (mean ± std over seeds,
ε recomputed from every cell's ledger) and leaves results.csv, report.md, report.html and
the plots in the output directory. Rerunning resumes: finished cells are skipped.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/privacy_utility.py --workers 2 \\
        --spec benchmarks/privacy_utility_r32.toml --out sweeps/r32 \\
        --archive benchmarks/results/privacy_utility \\
        --merge benchmarks/results/privacy_utility/earlier_results.csv

``--archive`` copies each cell's audit files (config, ledger, metrics, provenance, summary; no
weights) into a directory that can be committed, and writes the report there over every cell
archived so far, so ``fedsb-dp report`` can recompute each ε from the repository alone.
``--merge`` adds rows of an earlier results.csv whose cells were not archived.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.sweep import SweepSpec, run_sweep, write_report
from fedsb_dp.sweep.archive import archive_runs
from fedsb_dp.sweep.report import COLUMNS, aggregate, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="benchmarks/privacy_utility.toml")
    parser.add_argument("--out", default="benchmarks/results/privacy_utility")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at once (each gets cpu_count // workers threads)")
    parser.add_argument("--archive", metavar="DIR",
                        help="also copy the cells' audit files to DIR/cells and report there")
    parser.add_argument("--merge", action="append", default=[], metavar="RESULTS_CSV",
                        help="earlier results.csv rows to report with (repeatable)")
    args = parser.parse_args()
    quiet_expected_warnings()
    spec = SweepSpec.from_toml(args.spec)
    print(f"{len(spec.cells())} cells → {args.out}", flush=True)

    def progress(cell, status):
        eps = "∞" if math.isinf(cell.epsilon) else f"{cell.epsilon:g}"
        print(f"  {status:10s} ε={eps:4s} {cell.method:11s} r={cell.rank:<3d} {cell.partition:14s}"
              f" seed={cell.seed}", flush=True)

    run_sweep(spec, args.out, on_cell=progress, workers=args.workers)
    target = args.out
    if args.archive:
        write_report(args.out)  # the sweep's own report, beside its cells
        archive_runs(args.out, args.archive)
        target = args.archive
    outputs = write_report(target, merge=args.merge)
    print(markdown_table(aggregate(pd.read_csv(outputs["results"])), COLUMNS))
    print(f"report: {outputs['markdown']}")


if __name__ == "__main__":
    main()
