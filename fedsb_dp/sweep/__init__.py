"""Privacy-utility sweeps: a grid of runs, their results table and a report."""

from fedsb_dp.sweep.report import write_report
from fedsb_dp.sweep.results import collect_results
from fedsb_dp.sweep.runner import run_sweep
from fedsb_dp.sweep.spec import Cell, SweepSpec

__all__ = ["Cell", "SweepSpec", "collect_results", "run_sweep", "write_report"]
