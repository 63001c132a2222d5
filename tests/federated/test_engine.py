"""End-to-end private Fed-SB runs on the real MiniLM with a few hundred records."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from accounting import PrivacyLedger, federation_epsilon
from accounting.audit import audit_run
from fedsb_dp import narration
from fedsb_dp.console import show_narration
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig

SMALL = dict(max_train_records=240, max_eval_records=64, clients=3, rounds=2, local_steps=2,
             batch_size=8, max_length=32, rank=4)


def _config(tmp_path, name="run", **overrides):
    values = {**SMALL, "epsilon": 3.0, "out": str(tmp_path / name), **overrides}
    return RunConfig(**values)


def _steps_per_client(ledger: PrivacyLedger) -> dict[str, int]:
    return {cid: ledger.steps(cid) for cid in ledger.clients}


def _audits_from_ledger_and_provenance(run_dir: str) -> None:
    """The audit passes with config.json reduced to its digest: the ledger's plan suffices."""
    path = os.path.join(run_dir, "config.json")
    with open(path) as fh:
        saved = json.load(fh)
    with open(path, "w") as fh:
        json.dump({"digest": saved["digest"]}, fh)
    try:
        report = audit_run(run_dir)
    finally:
        with open(path, "w") as fh:
            json.dump(saved, fh)
    assert report.passed, report.format()
    assert "the ledger records the plan" in dict((n, d) for n, _, d in report.checks)[
        "recorded plan"]


def _peft_export_reloads_with_the_runs_logits(run_dir: str) -> None:
    """--export-peft of a CLS-pooled classifier: PEFT alone rebuilds the run's model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedsb_dp.runs import load_run

    own = load_run(run_dir).load_model()
    directory = os.path.join(run_dir, "peft_adapter")
    record = json.load(open(os.path.join(directory, "export.json")))
    assert record["pooling"] == "cls" and record["format"] == "peft"
    base = AutoModelForSequenceClassification.from_pretrained(
        record["base_model_path"], num_labels=len(record["label_names"]))
    peft = PeftModel.from_pretrained(base, directory).eval()
    batch = own.tokenizer(["a gripping film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(peft(**batch).logits, own.model(**batch).logits,
                                   atol=1e-5, rtol=1e-5)


def test_private_run_end_to_end(tmp_path):
    config = _config(tmp_path, pooling="cls")  # exports as AutoModelForSequenceClassification
    result = run_federation(config, progress=False, export_peft=True)
    assert result.status == "completed"
    _peft_export_reloads_with_the_runs_logits(result.run_dir)
    s = result.summary
    out = result.run_dir
    for name in ("config.json", "ledger.json", "metrics.jsonl", "provenance.json",
                 "summary.json", "final_adapter", "peft_adapter"):
        assert os.path.exists(os.path.join(out, name)), name
    ledger = PrivacyLedger.load(os.path.join(out, "ledger.json"))
    recomputed = federation_epsilon(ledger, delta=s["privacy"]["delta"], accountant="prv")
    assert s["privacy"]["epsilon"] == recomputed.epsilon
    assert 0 < recomputed.epsilon <= 3.0
    assert s["privacy"]["delta"] < 1 / sum(s["clients"].values())
    assert set(recomputed.per_client) == {"client-0", "client-1", "client-2"}
    assert _steps_per_client(ledger) == {c: 2 * 2 for c in recomputed.per_client}
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["round"] for m in metrics] == [1, 2]
    assert metrics[-1]["epsilon"] == pytest.approx(recomputed.epsilon)
    # Uplink per client per round = R of 24 layers... here 12 targets × r² + head, as bytes.
    assert s["bytes_up"] > 0 and s["bytes_up"] == s["bytes_down"]
    assert s["trainable_parameters"] == 12 * 4 * 4 + 384 * 2 + 2
    assert 0.0 <= s["test_accuracy"] <= 1.0
    # The ledger records the plan σ was calibrated for; the audit needs nothing else.
    plan = ledger.plan
    assert (plan.unit, plan.rounds, plan.local_steps) == ("example", 2, 2)
    assert plan.noise_multiplier == s["noise_multiplier"]
    assert plan.clip_norm == config.max_grad_norm
    assert plan.sampling_probabilities == {c: 8 / n for c, n in s["clients"].items()}
    assert plan.participation == {"rule": "all"} and plan.init_events == {}
    assert (plan.target_epsilon, plan.target_delta) == (3.0, s["privacy"]["delta"])
    _audits_from_ledger_and_provenance(out)


def test_existing_run_dir_is_never_overwritten(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="already exists"):
        run_federation(_config(tmp_path, "taken"), progress=False)
    assert (target / "keep.txt").read_text() == "precious"


def test_resume_after_interruption_between_rounds(tmp_path):
    config = _config(tmp_path, seed=7)
    first = run_federation(config, progress=False, stop_after_rounds=1)
    assert first.status == "interrupted"
    ledger = PrivacyLedger.load(os.path.join(first.run_dir, "ledger.json"))
    assert set(_steps_per_client(ledger).values()) == {2}
    resumed = run_federation(config, resume=True, progress=False)
    assert resumed.status == "completed"
    ledger = PrivacyLedger.load(os.path.join(first.run_dir, "ledger.json"))
    assert set(_steps_per_client(ledger).values()) == {4}  # nothing re-spent, nothing lost
    assert resumed.summary["rounds_completed"] == 2
    assert resumed.summary["uncommitted_rounds"] == [] and resumed.summary["message"] is None
    # The summary times the second attempt only: the sweep's speed estimate must not use it.
    from fedsb_dp.sweep.plan import wall_time

    assert wall_time(first.run_dir) is None


def test_crash_inside_round_keeps_the_charge_and_guard_stops(tmp_path, monkeypatch):
    from fedsb_dp.federated import client as client_module

    config = _config(tmp_path)
    original = client_module.DPClient.train_round
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # round 2, second client: noise of round 2 may be out
            raise KeyboardInterrupt("simulated kill inside a round")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(client_module.DPClient, "train_round", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_federation(config, progress=False)
    monkeypatch.setattr(client_module.DPClient, "train_round", original)
    ledger = PrivacyLedger.load(os.path.join(config.out, "ledger.json"))
    assert set(_steps_per_client(ledger).values()) == {4}  # round 2 reserved: counted
    resumed = run_federation(config, resume=True, progress=False)
    # σ was calibrated for exactly 2 rounds; redoing round 2 would pass the target.
    assert resumed.status == "stopped-budget"
    assert resumed.summary["privacy"]["epsilon"] <= 3.0
    ledger = PrivacyLedger.load(os.path.join(config.out, "ledger.json"))
    assert set(_steps_per_client(ledger).values()) == {4}
    # The summary says which round was charged without completing, and how to go on.
    with open(os.path.join(config.out, "summary.json")) as fh:
        saved = json.load(fh)
    assert saved["uncommitted_rounds"] == resumed.summary["uncommitted_rounds"] == [2]
    note = saved["message"]
    assert "round(s) 2 were charged in the ledger but never completed" in note
    assert "fedsb-dp run --config SETTINGS.toml --out NEW_DIR" in note
    assert note.startswith("round 2 would take ε to")  # the guard's own reason comes first
    _audits_from_ledger_and_provenance(config.out)  # the reserved round 2 is planned steps


def test_non_private_run_reports_infinite_epsilon(tmp_path):
    config = RunConfig(**{**SMALL, "no_dp": True, "rounds": 1, "out": str(tmp_path / "np")})
    result = run_federation(config, progress=False)
    assert math.isinf(result.summary["privacy"]["epsilon"])


def test_seeded_runs_are_reproducible_and_marked(tmp_path):
    a = run_federation(_config(tmp_path, "a", seed=3, rounds=1), progress=False)
    b = run_federation(_config(tmp_path, "b", seed=3, rounds=1), progress=False)
    from safetensors.torch import load_file

    wa = load_file(os.path.join(a.run_dir, "checkpoint.safetensors"))
    wb = load_file(os.path.join(b.run_dir, "checkpoint.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.summary["seed_mode"] == "seeded"
    ledger = PrivacyLedger.load(os.path.join(a.run_dir, "ledger.json"))
    assert ledger.metadata["noise_is_release"] is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"epsilon": -1.0}, "epsilon=-1.0"),
        ({"delta": 0.01}, "1/"),
        ({"rank": 500}, "rank=500"),
        ({"clients": 300}, "clients=300|num_clients=300"),
        ({"batch_size": 200}, "batch size 200"),
        ({"model": "/nonexistent/model-dir"}, "cannot load model"),
        ({"text_column": "sentence", "dataset": "__CSV__"}, "sentence"),
        ({"targets": ("q_proj",)}, "q_proj"),
        ({"epsilon": 1e-6}, "epsilon|ε|unreachable|σ"),
    ],
)
def test_bad_input_fails_before_spending(tmp_path, overrides, message):
    if overrides.get("dataset") == "__CSV__":
        csv = tmp_path / "d.csv"
        csv.write_text("text,label\n" + "\n".join(f"t{i},{i % 2}" for i in range(300)))
        overrides = {**overrides, "dataset": str(csv)}
    with pytest.raises(ValueError, match=message):
        run_federation(_config(tmp_path, **overrides), progress=False)
    assert not os.path.exists(tmp_path / "run" / "ledger.json")


def test_cli_run_and_bad_epsilon(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "run", "--epsilon", "-2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--epsilon -2" in bad.stderr
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "fedsb_dp.cli", "run", "--epsilon", "3", "--out", str(out),
            "--max-train-records", "240", "--max-eval-records", "64", "--rounds", "1",
            "--local-steps", "2", "--batch-size", "8", "--max-length", "32", "--rank", "4",
            "--no-progress"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "per-client ε" in done.stdout
    assert "communicated" in done.stdout and str(out) in done.stdout
    # What it is doing goes to stderr with the progress bars, in order; stdout keeps results.
    said = [line for line in done.stderr.splitlines()
            if line.startswith(("loading", "calibrating", "initialising", "round "))]
    assert [line.split(" ")[0] for line in said] == [
        "loading", "loading", "calibrating", "initialising", "round"], done.stderr
    assert said[2].startswith("calibrating σ for ε=3 at δ=")
    assert said[3] == "initialising adapters (w0-svd) …"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert said[4] == (f"round 1/1  validation accuracy {record['validation_accuracy']:.4f}  "
                       f"ε spent {record['epsilon']:.4f} of 3")
    assert "round 1/1" not in done.stdout


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fedsb_dp.cli", "run", "--epsilon", "3", "--out", str(out),
            "--max-train-records", "240", "--max-eval-records", "32", "--rounds", "3",
            "--local-steps", "3", "--batch-size", "8", "--max-length", "32", "--rank", "4",
            "--no-progress"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    ledger_before = PrivacyLedger.load(str(out / "ledger.json"))
    charged_before = _steps_per_client(ledger_before)
    assert min(charged_before.values()) >= 3
    resumed = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "run", "--resume", str(out),
                              "--no-progress"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode in (0, 1), resumed.stderr
    ledger_after = PrivacyLedger.load(str(out / "ledger.json"))
    after = _steps_per_client(ledger_after)
    assert all(after[c] >= charged_before[c] for c in after)  # nothing forgotten
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] <= 3.0


def test_toml_config_equals_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nepsilon = 2.0\nrank = 8\nclients = 4\ntargets = ["query"]\n')
    from_file = RunConfig.from_toml(str(toml), out="x")
    assert from_file == RunConfig(epsilon=2.0, rank=8, clients=4, targets=("query",), out="x")
    from fedsb_dp.cli import _run_config, build_parser

    flags = build_parser().parse_args(["run", "--epsilon", "2", "--rank", "8", "--clients", "4",
                                       "--targets", "query", "--out", "x"])
    assert _run_config(flags) == from_file
    toml.write_text("[run]\nepsilon = 2.0\nrnak = 8\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['rnak'\]"):
        RunConfig.from_toml(str(toml))


def test_client_level_mode_accounting(tmp_path):
    config = _config(tmp_path, dp_level="client", epsilon=20.0, rounds=2, participation=1.0)
    heard = io.StringIO()
    show_narration(stream=heard)
    try:
        result = run_federation(config, progress=False)
    finally:
        show_narration(False)
    # The per-round line shows the released record only: no client, cohort or traffic.
    released = [json.loads(line) for line in
                open(os.path.join(result.run_dir, "metrics.jsonl"), encoding="utf-8")]
    rounds = [line for line in heard.getvalue().splitlines() if line.startswith("round ")]
    assert rounds == [narration.round_line(r, rounds=2, target_epsilon=20.0) for r in released]
    assert not any("client-" in line or "participa" in line for line in rounds)
    assert result.status == "completed"
    ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
    assert ledger.unit == "client" and ledger.clients == ["federation"]
    assert ledger.steps("federation") == 2  # one Gaussian release per round
    from accounting import GaussianDpEvent, SelfComposedDpEvent, compute_epsilon

    z = result.summary["noise_multiplier"]
    expected = compute_epsilon(SelfComposedDpEvent(GaussianDpEvent(z), 2),
                               delta=result.summary["privacy"]["delta"])
    assert result.summary["privacy"]["epsilon"] == expected.epsilon <= 20.0
    assert result.summary["privacy"]["delta"] < 1 / 3  # below 1/#clients
    assert ledger.plan.sampling_probabilities == {"federation": 1.0}
    assert ledger.plan.participation == {"rule": "poisson-cohort", "probability": 1.0}
    _audits_from_ledger_and_provenance(result.run_dir)


def test_client_level_refuses_record_level_init(tmp_path):
    with pytest.raises(ConfigError, match="dp_level='client'"):
        _config(tmp_path, dp_level="client", init="gradient-svd", init_source="dp")


# End-to-end runs of the real offline model: the fast subset (-m "not slow") skips them.
pytestmark = pytest.mark.slow


def test_per_client_noise_run_charges_each_client_its_sigma_and_resume_keeps_it(tmp_path):
    config = _config(tmp_path, partition="dirichlet:0.3", noise="per-client")
    first = run_federation(config, progress=False, stop_after_rounds=1)
    path = os.path.join(first.run_dir, "ledger.json")
    sizes = PrivacyLedger.load(path).dataset_sizes
    sigmas = PrivacyLedger.load(path).plan.noise_multipliers
    by_size = sorted(sizes, key=sizes.get)  # more records, less noise
    assert [sigmas[c] for c in by_size] == sorted(sigmas.values(), reverse=True)
    resumed = run_federation(config, resume=True, progress=False)
    assert resumed.status == "completed"
    ledger = PrivacyLedger.load(path)
    assert ledger.plan.noise_multipliers == sigmas == resumed.summary["noise_multipliers"]
    for entry in ledger.to_json_dict()["body"]["entries"]:  # both rounds, each its own σᵢ
        assert entry["event"]["event"]["noise_multiplier"] == sigmas[entry["client"]]
    per_client = federation_epsilon(ledger, delta=ledger.target_delta).per_client
    assert all(2.97 <= r.epsilon <= 3.0 for r in per_client.values()), per_client
    report = audit_run(first.run_dir)
    assert report.passed, report.format()
