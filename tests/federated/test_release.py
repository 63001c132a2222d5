"""What a run releases: no single record steers control flow, nothing the analysis assumes
secret reaches a released file, timings stay operator-only."""

from __future__ import annotations

import json
import os

import pytest
import torch
from opacus import GradSampleModule

from accounting import PrivacyLedger
from fedsb_dp.adapters import SBConfig, find_target_modules, inject_adapters, w0_svd_init
from fedsb_dp.adapters.inject import trainable_state
from fedsb_dp.data import TokenizedDataset, make_collate
from fedsb_dp.federated import release
from fedsb_dp.federated.client import DPClient, LocalTrainingConfig
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.models import SEQUENCE_CLASSIFICATION as TASK
from fedsb_dp.sweep.archive import archive_runs
from fedsb_dp.sweep.results import run_row

SMALL = dict(max_train_records=240, max_eval_records=32, clients=3, rounds=2, local_steps=1,
             batch_size=8, max_length=32, rank=4)


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_split_record_keeps_every_field_once():
    record = {"round": 1, "epsilon": 0.5, "participants": ["client-0"], "elapsed_s": 3.0,
              "bytes_up": 10, "bytes_up_by_client": {"client-0": 10}, "clients": {"c": 5}}
    released, operator = release.split_record(record, dp_level="example")
    assert operator == {"elapsed_s": 3.0}  # record level: Nᵢ and participants are public
    released, operator = release.split_record(record, dp_level="client")
    assert released == {"round": 1, "epsilon": 0.5}
    assert {**released, **operator} == record
    assert release.expected_traffic({"a": 100, "b": 100, "c": 300}, participation=0.5,
                                    rounds=3) == 750


def _poison_hook(marker: int):
    """Embeddings of any example containing token ``marker`` become NaN (a planted record)."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        hit = (ids == marker).any(dim=1)
        return torch.where(hit.view(-1, 1, 1), torch.full_like(output, float("nan")), output)

    return hook


def test_nan_record_contributes_nothing_and_stops_nothing(minilm, rotten_tomatoes):
    model = minilm.model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    sb = SBConfig(rank=4, target_modules=("query", "value"))
    targets = find_target_modules(model, sb.target_modules, rank=4)
    inject_adapters(model, w0_svd_init(targets, rank=4).factors, sb)
    model.train()
    frame = rotten_tomatoes.train.head(9).reset_index(drop=True)
    clean = TokenizedDataset(frame.head(8), minilm.tokenizer, max_length=32)
    poisoned_set = TokenizedDataset(frame, minilm.tokenizer, max_length=32)
    seen = {t for i in range(8) for t in clean[i]["input_ids"]}
    marker = next(t for t in poisoned_set[8]["input_ids"] if t not in seen)
    model.bert.embeddings.register_forward_hook(_poison_hook(marker), with_kwargs=True)
    collate = make_collate(minilm.tokenizer)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    start = trainable_state(model)

    def train(dataset, batch_size):
        # q = b/N = 1: every record in every step. SGD with lr ∝ b makes both runs take the
        # step −η·Σ clip(gᵢ), so they agree exactly when the planted record adds nothing.
        local = LocalTrainingConfig(expected_batch_size=batch_size, local_steps=2,
                                    learning_rate=0.5 * batch_size, optimizer="sgd",
                                    max_grad_norm=1.0, noise_multiplier=0.0)
        client = DPClient("client-0", dataset, collate, task=TASK)
        return client.train_round(private, start, local,
                                  noise_generator=torch.Generator().manual_seed(0),
                                  sampling_generator=torch.Generator().manual_seed(0)).state

    with_nan = train(poisoned_set, 9)  # today's code stopped here (non-finite loss)
    without = train(clean, 8)
    assert all(torch.isfinite(v).all() for v in with_nan.values())
    assert any(not torch.equal(with_nan[k], start[k]) for k in start)
    for key in start:
        torch.testing.assert_close(with_nan[key], without[key], rtol=1e-4, atol=1e-6)


def test_client_level_releases_no_cohort_sizes_or_timings(tmp_path):
    # RDP: PRV calibration of a two-round client-level plan takes ~20 s on a busy CPU.
    config = RunConfig(**SMALL, dp_level="client", epsilon=3.0, participation=0.5,
                       accountant="rdp", out=str(tmp_path / "run"))
    result = run_federation(config, progress=False)
    assert result.status == "completed"
    out = result.run_dir
    # Spelled out here, not read from release.py, so the test does not trust the code it checks.
    hidden = {"participants", "bytes_up_by_client", "bytes_down_by_client", "bytes_up",
              "bytes_down", "clients", "elapsed_s", "wall_time_s"}
    for line in _lines(os.path.join(out, "metrics.jsonl")):
        assert not hidden & set(line), line
    summary = result.summary
    assert not (hidden - {"bytes_up", "bytes_down"}) & set(summary)
    assert summary["bytes_basis"] == "expected"
    assert "server" in summary["trust_model"]["trusted"]
    # The realised cohorts and traffic are the operator's, with the wall time.
    rounds = [x for x in _lines(os.path.join(out, "operator.jsonl")) if x["kind"] == "round"]
    assert [x["round"] for x in rounds] == [1, 2] and all("participants" in x for x in rounds)
    assert result.operator["wall_time_s"] > 0 and "clients" in result.operator
    payload = rounds[0]["bytes_up"] // max(1, len(rounds[0]["participants"]))
    if rounds[0]["participants"]:
        assert summary["bytes_up"] == round(0.5 * 3 * payload * 2)
    # What archive keeps (the files meant for release) names no client at all: no cohort,
    # no per-client bytes, no Nᵢ, no label counts.
    cell = archive_runs(out, str(tmp_path / "archive"))[0]
    kept = sorted(os.listdir(cell))
    assert "operator.jsonl" not in kept and "partition.json" not in kept
    for name in kept:
        with open(os.path.join(cell, name), encoding="utf-8") as fh:
            text = fh.read()
        assert "client-" not in text and "elapsed_s" not in text, name
    assert PrivacyLedger.load(os.path.join(cell, "ledger.json")).clients == ["federation"]
    row = run_row(cell)  # the report still reads a cell without Nᵢ or timings
    assert row["clients"] == 3 and row["wall_time_s"] is None


def test_nonfinite_release_stops_without_naming_data(tmp_path):
    # SGD steps lr·(noisy sum)/b with noise σC/b ≈ 90 per coordinate: lr = 3e38 overflows
    # float32 on the first step, so every client's noised update is ±inf (seeded: fixed).
    config = RunConfig(**{**SMALL, "rounds": 1}, epsilon=3.0, optimizer="sgd",
                       learning_rate=3e38, max_grad_norm=1000.0, accountant="rdp", seed=0,
                       out=str(tmp_path / "run"))
    result = run_federation(config, progress=False)
    assert result.status == "stopped-nonfinite"
    assert result.summary["message"] == release.NONFINITE_STOP_MESSAGE
    with open(os.path.join(result.run_dir, "summary.json"), encoding="utf-8") as fh:
        assert "client-" not in json.load(fh)["message"]
    stop = [x for x in _lines(os.path.join(result.run_dir, "operator.jsonl"))
            if x["kind"] == "stop"]
    assert len(stop) == 1 and "client-" in stop[0]["detail"] and stop[0]["round"] == 1
    ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
    # The discarded round stays charged: instructions went out, so its steps count.
    assert {cid: ledger.steps(cid) for cid in ledger.clients} == {
        cid: SMALL["local_steps"] for cid in ledger.clients}


@pytest.mark.parametrize("dp_level", ["example", "client"])
def test_trust_model_names_who_is_trusted(dp_level):
    model = release.trust_model(dp_level, engine="inprocess")
    assert set(model) == {"privacy_unit", "trusted", "adversary", "released"}
    assert ("raw" in model["trusted"]) == (dp_level == "client")


# End-to-end runs of the real offline model: the fast subset (-m "not slow") skips them.
pytestmark = pytest.mark.slow
