"""Privacy-utility benchmark: a sweep on the default model and data, then its report.

A thin driver over ``fedsb-dp sweep`` (the same code users run) with a checked-in grid,
``benchmarks/privacy_utility.toml``; prints the aggregated table (mean ± std over seeds,
ε recomputed from every cell's ledger) and leaves results.csv, report.md, report.html and
the plots in the output directory. Rerunning resumes: finished cells are skipped.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/privacy_utility.py \\
        --spec benchmarks/privacy_utility.toml --out benchmarks/results/privacy_utility
"""

from __future__ import annotations

import argparse
import math

from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.sweep import SweepSpec, run_sweep, write_report
from fedsb_dp.sweep.report import COLUMNS, aggregate, markdown_table
from fedsb_dp.sweep.results import collect_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="benchmarks/privacy_utility.toml")
    parser.add_argument("--out", default="benchmarks/results/privacy_utility")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at once (each gets cpu_count // workers threads)")
    args = parser.parse_args()
    quiet_expected_warnings()
    spec = SweepSpec.from_toml(args.spec)
    print(f"{len(spec.cells())} cells → {args.out}", flush=True)

    def progress(cell, status):
        eps = "∞" if math.isinf(cell.epsilon) else f"{cell.epsilon:g}"
        print(f"  {status:10s} ε={eps:4s} {cell.method:11s} r={cell.rank:<3d} {cell.partition:14s}"
              f" seed={cell.seed}", flush=True)

    run_sweep(spec, args.out, on_cell=progress, workers=args.workers)
    write_report(args.out)
    print(markdown_table(aggregate(collect_results(args.out, write=False)), COLUMNS))


if __name__ == "__main__":
    main()
