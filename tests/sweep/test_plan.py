"""A cell's wall time, as the sweep's speed estimate reads it from the operator log."""

from __future__ import annotations

import json

from fedsb_dp.federated import run_dir as rd
from fedsb_dp.sweep.plan import wall_time


def _log(path, records):
    path.mkdir()
    (path / rd.OPERATOR).write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_cell_run_in_one_go_reports_its_summary_wall_time(tmp_path):
    cell = _log(tmp_path / "whole", [
        {"kind": "round", "round": 1, "elapsed_s": 90.0, "round_time_s": 88.0},
        {"kind": "round", "round": 2, "elapsed_s": 181.0, "round_time_s": 91.0},
        {"kind": "summary", "wall_time_s": 190.0}])
    assert wall_time(cell) == 190.0


def test_a_resumed_cell_has_no_wall_time_for_the_estimate(tmp_path):
    # Killed after round 1, resumed: the second attempt's clock starts again at 0, and its
    # summary would time round 2 alone, half a cell.
    cell = _log(tmp_path / "resumed", [
        {"kind": "round", "round": 1, "elapsed_s": 90.0, "round_time_s": 88.0},
        {"kind": "resumed", "completed_rounds": 1},
        {"kind": "round", "round": 2, "elapsed_s": 92.0, "round_time_s": 91.0},
        {"kind": "summary", "wall_time_s": 95.0}])
    assert wall_time(cell) is None


def test_an_unfinished_or_unreadable_log_has_no_wall_time(tmp_path):
    assert wall_time(_log(tmp_path / "running", [
        {"kind": "round", "round": 1, "elapsed_s": 90.0}])) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / rd.OPERATOR).write_text("{not json\n")
    assert wall_time(str(broken)) is None
    assert wall_time(str(tmp_path / "missing")) is None
