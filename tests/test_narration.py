"""The console's per-round line and where narration goes."""

from __future__ import annotations

import io
import math

from fedsb_dp import narration
from fedsb_dp.cli import _print_summary
from fedsb_dp.console import show_narration
from fedsb_dp.federated.inprocess import RunResult
from fedsb_dp.federated.release import split_record


def test_round_line_of_a_classifier_an_lm_and_a_round_not_aggregated():
    record = {"round": 2, "validation_accuracy": 0.73125, "validation_loss": 0.5,
              "validation_macro_f1": 0.7, "epsilon": 2.10341, "aggregated": True}
    assert (narration.round_line(record, rounds=3, target_epsilon=3.0)
            == "round 2/3  validation accuracy 0.7312  ε spent 2.1034 of 3")
    lm = {"round": 1, "validation_loss": 1.23456, "validation_perplexity": 3.4,
          "validation_accuracy": None, "epsilon": 0.5, "aggregated": True}
    assert (narration.round_line(lm, rounds=2, target_epsilon=1.0)
            == "round 1/2  validation loss 1.2346  ε spent 0.5000 of 1")
    idle = {"round": 1, "validation_accuracy": None, "epsilon": math.inf, "aggregated": False}
    assert narration.round_line(idle, rounds=1, target_epsilon=None) == (
        "round 1/1  not aggregated (the model stays; see metrics.jsonl)  ε spent ∞ (non-private)")


def test_client_level_round_line_is_built_from_the_released_record():
    full = {"round": 1, "validation_accuracy": 0.5, "epsilon": 1.0, "aggregated": True,
            "participants": ["client-0"], "valid": ["client-0"], "bytes_up": 10,
            "elapsed_s": 3.0}
    released, _ = split_record(full, dp_level="client")
    line = narration.round_line(released, rounds=1, target_epsilon=2.0)
    assert "client-0" not in line and "bytes" not in line and "3.0" not in line


def test_narration_is_silent_unless_shown_and_never_doubled():
    heard = io.StringIO()
    narration.say("before")  # no front end asked: nobody hears it
    show_narration(stream=heard)
    show_narration(stream=heard)  # idempotent
    narration.say("loading model x …")
    show_narration(False)
    narration.say("after")
    assert heard.getvalue() == "loading model x …\n"


def test_client_level_summary_keeps_a_space_after_the_noise_label(capsys):
    summary = {"method": "fedsb", "partition": "iid", "test_accuracy": 0.7, "test_macro_f1": 0.6,
               "test_examples": 10, "privacy_unit": "client", "target_epsilon": 3.0,
               "privacy": {"epsilon": 2.9, "delta": 1e-3, "accountant": "prv",
                           "per_client_epsilon": {"federation": 2.9}},
               "noise_multiplier": 1.4055, "rounds_completed": 1, "rounds_planned": 1,
               "bytes_setup": 0, "bytes_up": 0, "bytes_down": 0, "trainable_parameters": 1,
               "seed_mode": "os-entropy"}
    _print_summary(RunResult(run_dir="r", status="completed", summary=summary))
    assert "  noise z (server) 1.4055\n" in capsys.readouterr().out
