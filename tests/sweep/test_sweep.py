"""Sweeps: grid, resumability, results recomputed from ledgers, reports."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from accounting.errors import LedgerIntegrityError
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.sweep import SweepSpec, collect_results, run_sweep, write_report

BASE = dict(max_train_records=120, max_eval_records=32, clients=2, rounds=1, local_steps=2,
            batch_size=8, max_length=16)


def _spec(**overrides):
    values = dict(epsilons=[3, "inf"], methods=["fedsb", "ffa-lora"], partitions=["iid"],
                  seeds=[0], ranks={"default": [2]}, base=BASE)
    values.update(overrides)
    return SweepSpec.from_dict(values)


def test_grid_order_and_names():
    spec = _spec(seeds=[0, 1], ranks={"fedsb": [2, 4], "default": [2]})
    cells = spec.cells()
    assert len(cells) == 2 * (2 + 1) * 2
    assert len({c.name for c in cells}) == len(cells)
    assert cells[0].name == "eps3_fedsb_r2_iid_s0"
    assert math.isinf(cells[-1].epsilon)


@pytest.mark.parametrize("overrides, message", [
    ({"epsilons": [0]}, "must be > 0"),
    ({"epsilons": ["x"]}, "must be a number"),
    ({"methods": ["fedavg"]}, "is not one of"),
    ({"partitions": ["dirichlet:-1"]}, "must be > 0"),
    ({"seeds": []}, "must not be empty"),
    ({"ranks": {"fedsb": [2]}}, "no ranks for methods"),
    ({"base": {**BASE, "rank": 4}}, "set by the grid"),
    ({"base": {**BASE, "clinets": 3}}, "unknown setting"),
])
def test_bad_specs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _spec(**overrides)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "grid")
    statuses = run_sweep(_spec(), out)
    assert set(statuses.values()) == {"completed"}
    return out


def test_results_recompute_epsilon_from_ledgers(sweep_dir):
    frame = collect_results(sweep_dir)
    assert len(frame) == 4
    private = frame[frame["target_epsilon"] == 3]
    assert (private["epsilon"] <= 3.0).all() and (private["epsilon"] > 0).all()
    assert frame[frame["target_epsilon"].apply(math.isinf)]["epsilon"].apply(math.isinf).all()
    # The same σ for both methods at the same ε (σ depends on ε, δ, q, steps only).
    assert private["noise_multiplier"].nunique() == 1
    assert os.path.exists(os.path.join(sweep_dir, "results.csv"))
    assert set(frame["max_length"]) == {16} and frame["model"].nunique() == 1


def test_report_does_not_trust_the_summary(sweep_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(sweep_dir, copy)
    cell = os.path.join(copy, "cells", "eps3_fedsb_r2_iid_s0", "summary.json")
    with open(cell, encoding="utf-8") as fh:
        summary = json.load(fh)
    truth = summary["privacy"]["epsilon"]
    summary["privacy"]["epsilon"] = 0.01  # a run that under-reports
    with open(cell, "w", encoding="utf-8") as fh:
        json.dump(summary, fh)
    outputs = write_report(copy)
    frame = pd.read_csv(outputs["results"])
    row = frame[frame["run"] == "eps3_fedsb_r2_iid_s0"].iloc[0]
    assert row["epsilon"] == pytest.approx(truth)
    assert row["claimed_epsilon"] == 0.01
    for name in ("markdown", "html", "accuracy_vs_epsilon.png", "accuracy_vs_bytes.png",
                 "noise_scale.png"):
        assert os.path.getsize(outputs[name]) > 0
    page = open(outputs["html"], encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == 3  # self-contained


def test_rerun_skips_finished_cells_and_redoes_unstarted_ones(sweep_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(sweep_dir, copy)
    victim = os.path.join(copy, "cells", "eps3_ffa-lora_r2_iid_s0")
    shutil.rmtree(victim)
    os.makedirs(victim)  # claimed but never started (e.g. killed while loading)
    statuses = run_sweep(_spec(), copy)
    assert statuses["eps3_ffa-lora_r2_iid_s0"] == "completed"
    assert os.path.exists(victim + ".incomplete-1")
    assert [s for n, s in statuses.items() if n != "eps3_ffa-lora_r2_iid_s0"] == ["skipped"] * 3


def test_a_grown_grid_extends_the_directory_and_other_settings_are_refused(sweep_dir,
                                                                           tmp_path):
    copy = str(tmp_path / "grown")
    shutil.copytree(sweep_dir, copy)
    before = open(os.path.join(copy, "sweep.json"), encoding="utf-8").read()
    for changed in ({"base": {**BASE, "max_length": 12}},
                    {"method_settings": {"ffa-lora": {"learning_rate": 0.5}}}):
        with pytest.raises(ConfigError, match=r"settings for \['(fedsb|ffa-lora)"):
            run_sweep(_spec(seeds=[0, 1], **changed), copy)
        assert open(os.path.join(copy, "sweep.json"), encoding="utf-8").read() == before
    grown = _spec(epsilons=[3], methods=["fedsb"], seeds=[0, 1])
    statuses = run_sweep(grown, copy)
    assert statuses == {"eps3_fedsb_r2_iid_s0": "skipped", "eps3_fedsb_r2_iid_s1": "completed"}
    record = json.load(open(os.path.join(copy, "sweep.json"), encoding="utf-8"))
    assert SweepSpec.from_dict(record["spec"]).digest() == grown.digest()
    assert record["previous_specs"] == [_spec().to_dict()]
    assert len(collect_results(copy)) == 5  # the cells outside the new grid are kept


def test_cli_report(sweep_dir):
    done = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "report", sweep_dir],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "report.html" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "sweep", "--out", "x",
                          "--epsilons", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must be > 0" in bad.stderr


def test_parallel_workers_match_the_serial_sweep(sweep_dir, tmp_path, monkeypatch):
    """Two worker processes give each cell the same run as the serial sweep: same ledger,
    same ε and, with the seeds and one thread each, the same accuracy. Left to itself, the
    sweep keeps one calibration cache for its cells, so both ε = 3 cells share one σ entry."""
    monkeypatch.delenv("FEDSB_DP_CALIBRATION_CACHE", raising=False)
    spec = _spec()
    out = str(tmp_path / "parallel")
    seen = []
    statuses = run_sweep(spec, out, workers=2, on_cell=lambda c, s: seen.append(c.name))
    assert set(statuses.values()) == {"completed"}
    assert len(os.listdir(os.path.join(out, "calibration-cache"))) == 1
    assert "FEDSB_DP_CALIBRATION_CACHE" not in os.environ  # restored after the sweep
    assert list(statuses) == [c.name for c in spec.cells()]  # grid order, whatever finished first
    assert sorted(seen) == sorted(statuses)
    serial = collect_results(sweep_dir, write=False).set_index("run")
    parallel = collect_results(out, write=False).set_index("run")
    assert list(parallel.index) == list(serial.index)
    for column in ("epsilon", "noise_multiplier", "bytes_total"):
        assert parallel[column].tolist() == pytest.approx(serial[column].tolist(), rel=1e-9)
    assert run_sweep(spec, out, workers=2) == {c.name: "skipped" for c in spec.cells()}


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="workers=0 must be a positive integer"):
        run_sweep(_spec(), str(tmp_path / "w"), workers=0)
    assert not os.path.exists(tmp_path / "w")  # nothing claimed


def test_method_settings_override_the_base_for_one_method():
    spec = _spec(method_settings={"fedsb": {"learning_rate": 0.01}})
    assert spec.settings_of("fedsb")["learning_rate"] == 0.01
    assert "learning_rate" not in spec.settings_of("ffa-lora")
    assert SweepSpec.from_dict(spec.to_dict()).digest() == spec.digest()
    assert "method_settings" not in _spec().to_dict()  # old sweep digests unchanged
    with pytest.raises(ConfigError, match=r"method_settings for \['flora'\]"):
        _spec(method_settings={"flora": {"learning_rate": 0.01}})
    with pytest.raises(ConfigError, match="set by the grid"):
        _spec(method_settings={"fedsb": {"rank": 4}})
    with pytest.raises(ConfigError, match="learning_rate"):
        _spec(method_settings={"fedsb": {"learning_rate": -1}})


def _frame(rows):
    base = dict(partition="iid", rank=16, target_epsilon=3.0, test_macro_f1=0.5, epsilon=3.0,
                noise_multiplier=1.0, noise_norm_per_step=1.0, trainable_parameters=10,
                bytes_total=100.0, learning_rate=0.01, batch_size=64, local_steps=10, rounds=3,
                init="w0-svd", num_clients=3)
    return pd.DataFrame([{**base, **r} for r in rows])


def test_comparison_names_the_best_of_each_side_and_calls_ties():
    from fedsb_dp.sweep.report import aggregate, comparison

    rows = [dict(method="fedsb", rank=16, seed=s, test_accuracy=a, bytes_total=100.0)
            for s, a in enumerate([0.70, 0.72, 0.74])]
    rows += [dict(method="fedsb", rank=64, seed=s, test_accuracy=a, bytes_total=900.0)
             for s, a in enumerate([0.60, 0.61, 0.62])]
    rows += [dict(method="ffa-lora", seed=s, test_accuracy=a, bytes_total=300.0)
             for s, a in enumerate([0.65, 0.66, 0.67])]
    rows += [dict(method="fedit", seed=s, test_accuracy=a, bytes_total=500.0)
             for s, a in enumerate([0.62, 0.63, 0.64])]
    rows += [dict(method="central-lora", seed=s, test_accuracy=0.99, bytes_total=0.0)
             for s in range(3)]  # a pooled-data reference is not a federated rival
    table = comparison(aggregate(_frame(rows)))
    row = table.iloc[0]
    assert row["fedsb"].startswith("r=16: 0.7200")
    assert row["best_baseline"].startswith("ffa-lora r=16: 0.6600")
    assert row["gap_points"] == pytest.approx(6.0)
    assert row["verdict"] == "Fed-SB ahead" and row["bytes_ratio"] == 3.0
    close = [dict(method="fedsb", seed=s, test_accuracy=a) for s, a in enumerate([0.6, 0.7])]
    close += [dict(method="fedit", seed=s, test_accuracy=a) for s, a in enumerate([0.64, 0.68])]
    assert comparison(aggregate(_frame(close))).iloc[0]["verdict"] == "tie"
    behind = [dict(method="fedsb", seed=s, test_accuracy=a) for s, a in enumerate([.5, .51])]
    behind += [dict(method="fedit", seed=s, test_accuracy=a) for s, a in enumerate([.6, .61])]
    assert comparison(aggregate(_frame(behind))).iloc[0]["verdict"] == "Fed-SB behind"
    single = [dict(method="fedsb", seed=0, test_accuracy=0.8),
              dict(method="fedit", seed=0, test_accuracy=0.7)]
    assert comparison(aggregate(_frame(single))).iloc[0]["verdict"] == (
        "one seed: no spread to judge by")


def test_paired_gaps_follow_each_seed_split():
    from fedsb_dp.sweep.report import aggregate, comparison

    # Split difficulty dominates the spread: unpaired it is a tie, seed by seed Fed-SB leads.
    ours = [0.80, 0.50, 0.65]
    theirs = [0.78, 0.47, 0.65]
    rows = [dict(method="fedsb", seed=s, test_accuracy=a) for s, a in enumerate(ours)]
    rows += [dict(method="ffa-lora", seed=s, test_accuracy=a) for s, a in enumerate(theirs)]
    rows += [dict(method="ffa-lora", seed=7, test_accuracy=0.99)]  # no Fed-SB run to pair with
    frame = _frame(rows)
    row = comparison(aggregate(frame), frame).iloc[0]
    # +1.67 [−2.13, +5.46] at 95 %: the interval contains 0, so no verdict.
    assert row["verdict"] == "not distinguishable"
    assert row["paired_gaps"] == "3/3 seeds ≥ 0: +2.00, +3.00, +0.00"
    behind = _frame([dict(method="fedsb", seed=0, test_accuracy=0.5),
                     dict(method="fedit", seed=0, test_accuracy=0.6)])
    assert comparison(aggregate(behind), behind).iloc[0]["paired_gaps"] == (
        "0/1 seeds ≥ 0: -10.00")
    assert "paired_gaps" not in comparison(aggregate(behind)).columns


def test_report_warns_when_a_row_averages_different_budgets():
    from fedsb_dp.sweep.report import mixed_settings

    same = _frame([dict(method="fedsb", seed=s, test_accuracy=0.7) for s in range(2)])
    assert mixed_settings(same) == []
    mixed = _frame([dict(method="fedsb", seed=0, test_accuracy=0.7),
                    dict(method="fedsb", seed=1, test_accuracy=0.7, learning_rate=0.002)])
    assert mixed_settings(mixed) and "learning_rate" in mixed_settings(mixed)[0]
    models = _frame([dict(method="fedsb", seed=0, test_accuracy=0.7, model="minilm"),
                     dict(method="fedsb", seed=1, test_accuracy=0.8, model="mpnet")])
    assert "['model'] differ" in mixed_settings(models)[0]
    unset = _frame([dict(method="fedsb", seed=s, test_accuracy=0.7, max_train_records=None)
                    for s in range(2)])
    assert mixed_settings(unset) == []  # an unset cap is the same setting in both runs


def test_merged_grids_of_other_client_counts_or_datasets_stay_apart():
    from fedsb_dp.sweep.report import aggregate, comparison, distinguish_setups, mixed_settings

    rows = []
    for clients, ours, theirs in ((3, 0.72, 0.70), (10, 0.60, 0.66)):
        rows += [dict(method="fedsb", seed=s, test_accuracy=ours + 0.01 * s,
                      num_clients=clients) for s in range(3)]
        rows += [dict(method="ffa-lora", seed=s, test_accuracy=theirs + 0.01 * s,
                      num_clients=clients) for s in range(3)]
    frame = distinguish_setups(_frame(rows))
    assert mixed_settings(frame) == []
    summary = aggregate(frame)
    assert sorted(summary["partition"].unique()) == ["iid · 10 clients", "iid · 3 clients"]
    versus = comparison(summary, frame)
    assert versus["partition"].tolist() == ["iid · 3 clients", "iid · 10 clients"]
    assert versus["verdict"].tolist() == ["Fed-SB ahead", "Fed-SB behind"]
    # one grid, or grids that agree on the setup: labels untouched
    assert distinguish_setups(_frame(rows[:6]))["partition"].eq("iid").all()
    both = distinguish_setups(_frame([dict(method="fedsb", seed=0, test_accuracy=0.7,
                                           dataset=d) for d in ("rt", "20newsgroups")]))
    assert sorted(both["partition"]) == ["iid · 20newsgroups", "iid · rt"]


def test_a_refused_cell_is_named_by_the_report_and_kept_by_the_archive(sweep_dir, tmp_path):
    from fedsb_dp.sweep.archive import archive_runs

    out = str(tmp_path / "grid")
    shutil.copytree(sweep_dir, out)
    # 120 records cannot give 2 clients 50 records of each label: refused before training.
    skewed = _spec(partitions=["iid", "dirichlet:0.5:50"])
    statuses = run_sweep(skewed, out)
    refused = [name for name, status in statuses.items() if status == "failed"]
    assert refused and all("dirichlet" in name for name in refused)
    for directory in (out, str(tmp_path / "archive")):
        if directory != out:
            archive_runs(out, directory)
        report = open(write_report(directory)["markdown"], encoding="utf-8").read()
        assert f"Cells that did not run ({len(refused)})" in report
        for name in refused:
            assert f"`{name}`" in report
        assert report.count("no budget spent") == len(refused)
        html_page = open(os.path.join(directory, "report.html"), encoding="utf-8").read()
        assert "Cells that did not run" in html_page
    archived = os.path.join(tmp_path, "archive", "cells", refused[0])
    assert "50" in json.load(open(os.path.join(archived, "error.json"), encoding="utf-8"))[
        "error"]
    # Once the cell has finished (its files stand in for a rerun here), archiving again
    # replaces the failure record with the run.
    cell = os.path.join(out, "cells", refused[0])
    shutil.rmtree(cell)
    shutil.copytree(os.path.join(out, "cells", "eps3_fedsb_r2_iid_s0"), cell)
    archive_runs(out, str(tmp_path / "archive"))
    assert os.path.exists(os.path.join(archived, "summary.json"))
    assert not os.path.exists(os.path.join(archived, "error.json"))


def test_an_archive_keeps_no_weights_and_reports_from_its_own_ledgers(sweep_dir, tmp_path):
    from fedsb_dp.sweep.archive import AUDIT_FILES, archive_runs

    dest = str(tmp_path / "archive")
    cells = archive_runs(sweep_dir, dest)
    assert [os.path.basename(c) for c in cells] == sorted(os.listdir(os.path.join(sweep_dir,
                                                                                  "cells")))
    for cell in cells:
        assert sorted(os.listdir(cell)) == sorted(AUDIT_FILES)  # no adapters, no label counts
    original = collect_results(sweep_dir, write=False)
    pd.testing.assert_frame_equal(collect_results(dest, write=False), original)
    assert archive_runs(sweep_dir, dest) == cells  # archiving again changes nothing
    # No path of the machine that ran it: the archived config has no `out`, same digest.
    from accounting.audit import audit_run

    for cell in cells:
        record = json.load(open(os.path.join(cell, "config.json"), encoding="utf-8"))
        assert "out" not in record["config"] and sweep_dir not in json.dumps(record)
        assert RunConfig.from_dict(record["config"]).digest() == record["digest"]
    checks = {name: ok for name, ok, _ in audit_run(cells[0]).checks}
    assert checks["config"]
    # The archived ledger is what the report reads, and an edited one is refused, not used.
    ledger = os.path.join(dest, "cells", "eps3_fedsb_r2_iid_s0", "ledger.json")
    text = open(ledger, encoding="utf-8").read()
    assert text.count('"count": 2') >= 2
    with open(ledger, "w", encoding="utf-8") as fh:
        fh.write(text.replace('"count": 2', '"count": 1'))
    with pytest.raises(LedgerIntegrityError, match="does not match its sha256"):
        collect_results(dest, write=False)
    with pytest.raises(ConfigError, match="already archives a different run named "
                                          "'eps3_fedsb_r2_iid_s0'"):
        archive_runs(sweep_dir, dest)


def test_merged_results_join_the_report_counted_apart(sweep_dir, tmp_path):
    copy = str(tmp_path / "merged")
    shutil.copytree(sweep_dir, copy)
    earlier = collect_results(sweep_dir, write=False)
    earlier["run"] = "old_" + earlier["run"]
    earlier["seed"] = 7
    old = str(tmp_path / "earlier.csv")
    earlier.to_csv(old, index=False)
    outputs = write_report(copy, merge=[old])
    frame = pd.read_csv(outputs["results"])
    assert len(frame) == 8
    assert frame["source"].value_counts().to_dict() == {"ledger": 4, "earlier.csv": 4}
    assert frame[frame["run"] == "old_eps3_fedsb_r2_iid_s0"]["epsilon"].iloc[0] <= 3.0
    text = open(outputs["markdown"], encoding="utf-8").read()
    assert "4 runs' ε recomputed from their ledgers" in text
    assert "4 rows from earlier.csv" in text
    assert "| 2 |" in text  # each row now averages two seeds
    same_runs = str(tmp_path / "same.csv")
    collect_results(sweep_dir, write=False).to_csv(same_runs, index=False)
    with pytest.raises(ConfigError, match="appear in more than one source"):
        write_report(copy, merge=[same_runs])
    earlier.drop(columns=["epsilon"]).to_csv(old, index=False)
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) \['epsilon'\]"):
        write_report(copy, merge=[old])
    done = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "archive", copy,
                           str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "archived 4 run(s)" in done.stdout


def test_accuracy_grid_puts_fedsb_first_and_leaves_unrun_cells_empty():
    from fedsb_dp.sweep.report import accuracy_grid, aggregate

    rows = [dict(method="fedit", seed=s, test_accuracy=0.6) for s in range(2)]
    rows += [dict(method="fedsb", rank=64, seed=s, test_accuracy=a)
             for s, a in enumerate([0.7, 0.8])]
    rows += [dict(method="fedsb", seed=0, test_accuracy=0.75)]
    rows += [dict(method="fedsb", seed=0, test_accuracy=0.5, target_epsilon=1.0,
                  noise_multiplier=2.5)]
    grid = accuracy_grid(aggregate(_frame(rows)))
    assert list(grid.columns) == ["partition", "ε", "fedsb r=16", "fedsb r=64", "fedit r=16",
                                  "σ"]
    assert grid["ε"].tolist() == ["1", "3"]
    low, high = grid.iloc[0], grid.iloc[1]
    assert low["fedsb r=16"] == "0.500 ± 0.000 (1)" and low["fedit r=16"] == ""
    assert low["σ"] == "2.500"
    assert high["fedsb r=64"] == "0.750 ± 0.071 (2)"



def test_partitions_in_paper_order_iid_then_dirichlet_by_decreasing_alpha(tmp_path,
                                                                          monkeypatch):
    import matplotlib.axes

    from fedsb_dp.sweep.report import _plots, accuracy_grid, aggregate

    order = ["dirichlet:0.1", "iid", "dirichlet:1", "dirichlet:0.3"]
    summary = aggregate(_frame([dict(method="fedsb", seed=0, test_accuracy=0.7, partition=p)
                                for p in order]))
    paper = ["iid", "dirichlet:1", "dirichlet:0.3", "dirichlet:0.1"]
    assert accuracy_grid(summary)["partition"].tolist() == paper
    titles = []
    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, text, *a, **k: (titles.append(text),
                                                   original(ax, text, *a, **k))[1])
    _plots(summary, str(tmp_path))
    assert titles[:4] == [f"partition: {p}" for p in paper]  # accuracy vs ε, one per panel
    assert titles[4:8] == [f"{p}, ε = 3" for p in paper]  # the Pareto panels


def test_label_mix_splits_sort_after_dirichlet_and_before_size_skew():
    from fedsb_dp.sweep.report import partition_key

    shuffled = ["quantity:0.5", "labelmix:0.1", "iid", "labelmix:1", "dirichlet:0.3", "pooled"]
    assert sorted(shuffled, key=partition_key) == [
        "iid", "dirichlet:0.3", "labelmix:1", "labelmix:0.1", "quantity:0.5", "pooled"]

# End-to-end runs of the real offline model: the fast subset (-m "not slow") skips them.
pytestmark = pytest.mark.slow


def _grid_flags(seeds: str) -> list[str]:
    """The CLI form of ``_spec(seeds=…)``: the fixture's grid and base settings."""
    sets = [f"--set={k}={v}" for k, v in BASE.items()]
    return ["--epsilons", "3,inf", "--methods", "fedsb,ffa-lora", "--partitions", "iid",
            "--ranks", "2", "--seeds", seeds, *sets]


def _tree(path):
    return sorted((os.path.relpath(os.path.join(d, f), path),
                   os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(path) for f in files)


def test_dry_run_prints_the_plan_and_writes_nothing(sweep_dir, tmp_path, capsys):
    from fedsb_dp.cli import main
    from fedsb_dp.sweep.plan import format_duration, wall_time

    new = tmp_path / "new"
    assert main(["sweep", "--out", str(new), *_grid_flags("0,1,2"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not new.exists()
    assert out[0] == f"sweep: 12 cells → {new}"
    assert out[1].split() == ["method", "ε", "partition", "ranks", "seeds", "cells", "done"]
    assert out[2].split() == ["fedsb", "3", "iid", "2", "0,1,2", "3", "0"]
    assert out[5].split() == ["ffa-lora", "∞", "iid", "2", "0,1,2", "3", "0"]
    assert "MiniLM constant" in out[6] and out[6].startswith("estimate: 12 cell(s) ≈ ")
    before = _tree(sweep_dir)
    assert main(["sweep", "--out", sweep_dir, *_grid_flags("0"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(4 done, 0 to run)") and out[-1].endswith("every cell is done)")
    # A grown grid on this machine: the 4 new cells cost what the 4 finished ones took.
    assert main(["sweep", "--out", sweep_dir, *_grid_flags("0,1"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(4 done, 4 to run)") and out[2].split()[-2:] == ["2", "1"]
    times = sorted(wall_time(os.path.join(sweep_dir, "cells", c.name))
                   for c in _spec().cells())
    median = (times[1] + times[2]) / 2
    assert out[-1] == (f"estimate: 4 cell(s) ≈ {format_duration(4 * median)} with 1 worker(s) "
                       "(measured on 4 finished cell(s) of this sweep on this machine)")
    assert _tree(sweep_dir) == before


def test_cli_sweep_prints_the_plan_then_the_first_cells_speed(sweep_dir, tmp_path, capsys):
    from fedsb_dp.cli import main

    copy = str(tmp_path / "grown-cli")
    shutil.copytree(sweep_dir, copy)
    flags = [f for f in _grid_flags("0,1") if f not in ("3,inf", "fedsb,ffa-lora")]
    flags[flags.index("--epsilons") + 1:flags.index("--epsilons") + 1] = ["3"]
    flags[flags.index("--methods") + 1:flags.index("--methods") + 1] = ["fedsb"]
    assert main(["sweep", "--out", copy, *flags, "--seeds", "0,1,2", "--no-progress",
                 "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep: 3 cells → {copy} (1 done, 2 to run)"
    assert out[3].startswith("estimate: 2 cell(s) ≈ ") and "measured on 4" not in out[3]
    assert out[4].split()[:2] == ["skipped", "ε=3"] and out[5].split()[0] == "completed"
    assert out[6].startswith("  first cell took ") and "the 1 left ≈ " in out[6]
    assert out[7].split()[0] == "completed"


def test_unfinished_cells_tell_whether_their_ledger_charges_anything(sweep_dir, tmp_path):
    from fedsb_dp.sweep.results import unfinished_cells

    finished = os.path.join(sweep_dir, "cells", "eps3_fedsb_r2_iid_s0")
    cells = tmp_path / "grid" / "cells"
    for name in ("a_refused", "b_failed_mid_run", "c_tampered", "d_finished", "e_empty_ledger"):
        (cells / name).mkdir(parents=True)
        (cells / name / "error.json").write_text(json.dumps({"error": f"ConfigError: {name}"}))
    shutil.copy(os.path.join(finished, "ledger.json"), cells / "b_failed_mid_run")
    (cells / "c_tampered" / "ledger.json").write_text(
        open(os.path.join(finished, "ledger.json"), encoding="utf-8").read()
        .replace('"count": 2', '"count": 1'))
    shutil.copy(os.path.join(finished, "summary.json"), cells / "d_finished")
    from accounting import PrivacyLedger  # created, nothing released yet

    PrivacyLedger(dataset_sizes={"client-0": 60, "client-1": 60}, target_epsilon=3.0,
                  target_delta=1e-3).save(str(cells / "e_empty_ledger" / "ledger.json"))
    found = {c["run"]: c for c in unfinished_cells(str(tmp_path / "grid"))}
    assert {n: c["spent"] for n, c in found.items()} == {
        "a_refused": False, "b_failed_mid_run": True, "c_tampered": True,
        "e_empty_ledger": False}
    assert found["a_refused"]["error"] == "ConfigError: a_refused"
    assert found["a_refused"]["path"] == str(cells / "a_refused")


def test_cli_sweep_whose_every_cell_is_refused_says_why(tmp_path, capsys):
    from fedsb_dp.cli import main

    out = str(tmp_path / "refused")
    flags = _grid_flags("0")
    flags[flags.index("--partitions") + 1] = "dirichlet:0.5:50"  # 120 records cannot
    flags[flags.index("--epsilons") + 1] = "3"
    flags[flags.index("--methods") + 1] = "fedsb"
    assert main(["sweep", "--out", out, *flags, "--no-progress", "-q"]) == 1
    printed = capsys.readouterr().out
    assert "  eps3_fedsb_r2_dirichlet-0.5-50_s0: ConfigError: " in printed
    assert f"no cell of {out!r} finished: no report" in printed
    assert main(["archive", out, str(tmp_path / "kept")]) == 0
    assert os.listdir(tmp_path / "kept" / "cells") == ["eps3_fedsb_r2_dirichlet-0.5-50_s0"]


def test_the_answer_reads_real_runs_and_refuses_a_grid_counted_twice(sweep_dir, tmp_path):
    from fedsb_dp.sweep.answer import Experiment, answer_table, read_experiment

    frame = read_experiment(Experiment("tiny", (sweep_dir,)))
    assert set(frame["noise"]) == {"shared"} and set(frame["participation"]) == {1.0}
    private = answer_table({"tiny": frame}).set_index("target_epsilon").loc[3.0]
    assert private["fedsb"].startswith("fedsb r=2: ") and private["head_only"] == ""
    assert private["best_baseline"].startswith("ffa-lora r=2: ")
    copy = str(tmp_path / "copy")
    shutil.copytree(sweep_dir, copy)
    with pytest.raises(ConfigError, match="appear in more than one grid"):
        read_experiment(Experiment("twice", (sweep_dir, copy)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="experiment 'none': .* holds no finished run"):
        read_experiment(Experiment("none", (str(tmp_path / "empty"),)))


def test_report_html_renders_in_a_real_browser(sweep_dir, tmp_path):
    """report.html in headless Chromium: every plot decodes and the page is not blank.

    Skipped on a workstation without Chromium; under CI (CI=true) a missing browser fails.
    """
    import io
    import pathlib

    import matplotlib.image
    from browser import Browser, chromium_path

    executable = chromium_path()
    if executable is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the browser test: apt-get install -y chromium")
        pytest.skip("no Chromium on this machine (apt-get install -y chromium); CI runs it")
    copy = str(tmp_path / "report")
    shutil.copytree(sweep_dir, copy)
    page = write_report(copy)["html"]
    with Browser(executable) as browser:
        browser.open(pathlib.Path(page).resolve().as_uri())
        images = browser.evaluate(
            "Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth])")
        text = browser.evaluate("document.body.innerText")
        png = browser.screenshot()
    assert [alt for alt, _, _ in images] == ["accuracy_vs_epsilon.png", "accuracy_vs_bytes.png",
                                             "noise_scale.png"]
    assert all(complete and width > 0 for _, complete, width in images), images
    assert "fedsb" in text
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] > 600 and pixels.shape[1] >= 1200
    assert pixels[..., :3].std() > 0.05  # a blank or single-colour page is ~0
