"""The benchmark's answer: experiments checked before they are compared, verdicts counted."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from fedsb_dp.errors import ConfigError
from fedsb_dp.sweep.answer import (
    Experiment,
    answer_markdown,
    answer_table,
    cell_size,
    check_experiment,
    missing_cells,
    verdict_counts,
)
from fedsb_dp.sweep.paired import AHEAD, BEHIND, UNDECIDED, paired_difference

BUDGET = dict(dataset="rotten-tomatoes", model="minilm", num_clients=10, participation=1.0,
              noise="shared", batch_size=32, local_steps=5, rounds=3, max_length=32,
              max_train_records=None, max_eval_records=400, eval_sample="hashed",
              max_grad_norm=3.0)


def _runs(method, accuracies, *, rank=16, eps=3.0, partition="iid", **settings):
    return [dict(run=f"eps{eps:g}_{method}_r{rank}_{partition}_s{seed}", method=method,
                 rank=rank, seed=seed, partition=partition, target_epsilon=eps,
                 epsilon=eps - 1e-4 if math.isfinite(eps) else math.inf, test_accuracy=acc,
                 noise_multiplier=0.7, **{"learning_rate": 0.01, **BUDGET, **settings})
            for seed, acc in enumerate(accuracies)]


def _frame(*groups):
    return pd.DataFrame([row for group in groups for row in group])


def test_a_consistent_experiment_passes_and_each_method_keeps_its_own_step():
    frame = _frame(_runs("fedsb", [0.7, 0.71, 0.72], learning_rate=0.03),
                   _runs("head-only", [0.69, 0.7, 0.7], learning_rate=0.05))
    check_experiment(frame, "ok")  # learning rates differ by design: not a budget mismatch


def test_methods_at_different_budgets_are_refused_with_the_values():
    frame = _frame(_runs("fedsb", [0.7, 0.71, 0.72]),
                   _runs("head-only", [0.69, 0.7, 0.7], batch_size=64))
    with pytest.raises(ConfigError, match=r"iid at ε = 3: batch_size differs "
                                          r"\(fedsb: \['32'\], head-only: \['64'\]\)"):
        check_experiment(frame, "mixed")
    # Another noise mode is another experiment too (per-client σ vs one shared σ).
    per_client = _frame(_runs("fedsb", [0.7, 0.71]), _runs("ffa-lora", [0.6, 0.6],
                                                             noise="per-client"))
    with pytest.raises(ConfigError, match="noise differs"):
        check_experiment(per_client, "noise")


def test_a_run_over_its_target_or_counted_twice_is_refused():
    runs = _runs("fedsb", [0.7, 0.71, 0.72])
    runs[1]["epsilon"] = 3.0001
    with pytest.raises(ConfigError, match=r"eps3_fedsb_r16_iid_s1 \(ε = 3.0001 > 3\)"):
        check_experiment(_frame(runs), "over")
    exact = _runs("fedsb", [0.7])
    exact[0]["epsilon"] = 3.0  # at the target is within it
    check_experiment(_frame(exact), "at target")
    twice = _runs("fedsb", [0.7, 0.71])
    with pytest.raises(ConfigError, match="appear in more than one grid"):
        check_experiment(_frame(twice, twice), "twice")


def test_answer_pairs_the_best_fedsb_rank_with_the_head_and_the_best_adapter_baseline():
    frame = _frame(
        _runs("fedsb", [0.70, 0.72, 0.74]),
        _runs("fedsb", [0.60, 0.61, 0.62], rank=64),
        _runs("head-only", [0.69, 0.70, 0.71]),
        _runs("ffa-lora", [0.65, 0.66, 0.67]),
        _runs("fedit", [0.66, 0.67, 0.66]),
        _runs("central-lora", [0.99, 0.99, 0.99]),  # a pooled reference is no rival
        _runs("fedsb", [0.8, 0.8], eps=math.inf),
        _runs("ffa-lora", [0.7, 0.7], eps=math.inf),
    )
    table = answer_table({"RT": frame})
    assert list(table["target_epsilon"]) == [3.0, math.inf]
    row = table.iloc[0]
    assert row["fedsb"] == "fedsb r=16: 0.720 ± 0.020 (3)"
    assert row["head_only"] == "0.700 ± 0.010 (3)"
    assert row["best_baseline"] == "fedit r=16: 0.663 ± 0.006 (3)"
    expected = paired_difference({0: 0.70, 1: 0.72, 2: 0.74}, {0: 0.66, 1: 0.67, 2: 0.66})
    assert row["vs_best_baseline"] == expected.describe()
    assert row["verdict_best_baseline"] == AHEAD == expected.verdict
    # gaps 1, 2, 3 points: [−0.48, +4.48] contains 0, so no verdict against the head
    assert row["vs_head_only"] == "+2.00 [-0.48, +4.48] (n=3)"
    assert row["verdict_head_only"] == UNDECIDED
    assert row["sigma"] == pytest.approx(0.7)
    free = table.iloc[1]
    assert free["head_only"] == "" and free["verdict_head_only"] == ""
    assert free["best_baseline"].startswith("ffa-lora r=16") and free["sigma"] == 0.0


def test_verdicts_are_counted_over_private_cells_only():
    table = pd.DataFrame([
        dict(target_epsilon=1.0, verdict_head_only=UNDECIDED, verdict_best_baseline=AHEAD),
        dict(target_epsilon=3.0, verdict_head_only=BEHIND, verdict_best_baseline=AHEAD),
        dict(target_epsilon=math.inf, verdict_head_only=AHEAD, verdict_best_baseline=AHEAD),
    ])
    counts = verdict_counts(table)
    assert counts["head_only"][UNDECIDED] == 1 and counts["head_only"][BEHIND] == 1
    assert counts["head_only"][AHEAD] == 0
    assert counts["best_baseline"][AHEAD] == 2


def test_markdown_states_each_experiments_cell_size():
    frame = _frame(_runs("fedsb", [0.7, 0.72]), _runs("head-only", [0.71, 0.71]))
    frame["participation"] = 1 / 3
    table = answer_table({"RT, 30 clients": frame})
    size = cell_size(frame)
    assert size == ("rotten-tomatoes, all training records over 10 clients (0.33 per round); "
                    "3 rounds × 5 local steps × expected batch 32, 32 tokens, shared σ, "
                    "400 test records (hashed sample)")
    text = answer_markdown(table, {"RT, 30 clients": frame},
                           [Experiment("RT, 30 clients", ("grid",))])
    assert size in text
    assert "against the private head alone: Fed-SB ahead in 0, behind in 0, not " \
           "distinguishable in 1." in text


def test_cells_that_did_not_run_are_named_with_their_reason(tmp_path):
    grid = tmp_path / "clients30"
    refusal = ("ConfigError: dirichlet:0.3 over 30 clients left a client with fewer than 32 "
               "records in every draw")
    for seed in (0, 1):
        cell = grid / "cells" / f"eps3_fedsb_r16_dirichlet-0.3_s{seed}"
        cell.mkdir(parents=True)
        (cell / "error.json").write_text(json.dumps({"error": refusal}))
    experiment = Experiment("RT, 30 clients", (str(grid),))
    missing = missing_cells(experiment)
    assert [(m["run"], m["reason"]) for m in missing] == [
        (f"eps3_fedsb_r16_dirichlet-0.3_s{seed}", f"{refusal} (no budget spent)")
        for seed in (0, 1)]
    frame = _frame(_runs("fedsb", [0.7, 0.72]), _runs("head-only", [0.71, 0.71]))
    table = answer_table({experiment.name: frame})
    text = answer_markdown(table, {experiment.name: frame}, [experiment],
                           {experiment.name: missing})
    assert ("- **RT, 30 clients**, 2 cells (`eps3_fedsb_r16_dirichlet-0.3_s0`, "
            "`eps3_fedsb_r16_dirichlet-0.3_s1`): " + refusal + " (no budget spent)") in text
    # Nothing missing: no section at all.
    assert "did not run" not in answer_markdown(table, {experiment.name: frame}, [experiment],
                                                {experiment.name: []})
