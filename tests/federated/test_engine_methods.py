"""Every method through the same engine: same σ, same ledger, own trainable set and traffic."""

from __future__ import annotations

import json
import os

import pytest

from accounting import PrivacyLedger, federation_epsilon
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig

SMALL = dict(max_train_records=240, max_eval_records=48, clients=3, rounds=2, local_steps=2,
             batch_size=8, max_length=24, rank=4, seed=3)
LAYERS = 12  # MiniLM: 6 layers × (query, value)
HEAD = 384 * 2 + 2


def _run(tmp_path, method, **overrides):
    config = RunConfig(**{**SMALL, "epsilon": 3.0, "method": method,
                          "out": str(tmp_path / method), **overrides})
    return run_federation(config, progress=False)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("methods")
    return {m: _run(base, m) for m in ("fedsb", "fedit", "ffa-lora", "fedex-lora", "flora",
                                       "head-only")}


def test_same_sigma_and_epsilon_for_every_method(runs):
    sigmas = {m: r.summary["noise_multiplier"] for m, r in runs.items()}
    assert len(set(sigmas.values())) == 1, sigmas
    for method, result in runs.items():
        assert result.status == "completed", method
        ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
        assert ledger.metadata["method"] == method
        recomputed = federation_epsilon(ledger, delta=result.summary["privacy"]["delta"])
        assert recomputed.epsilon == result.summary["privacy"]["epsilon"] <= 3.0
        assert {c: ledger.steps(c) for c in ledger.clients} == {
            f"client-{i}": 4 for i in range(3)}


def test_trainable_parameter_counts(runs):
    d = {m: r.summary["trainable_parameters"] for m, r in runs.items()}
    r = SMALL["rank"]
    assert d["fedsb"] == LAYERS * r * r + HEAD
    assert d["fedit"] == d["fedex-lora"] == d["flora"] == LAYERS * r * (384 + 384) + HEAD
    assert d["ffa-lora"] == LAYERS * r * 384 + HEAD
    assert d["head-only"] == HEAD
    # None of these alternates: each step noises every trainable parameter.
    assert {m: r.summary["noised_parameters"] for m, r in runs.items()} == d


def test_measured_traffic_per_client_per_round(runs):
    per_round = {}
    for method, result in runs.items():
        metrics = _metrics(result.run_dir)
        assert len(metrics) == 2
        for m in metrics:
            assert set(m["bytes_up_by_client"]) == {"client-0", "client-1", "client-2"}
            assert sum(m["bytes_up_by_client"].values()) == m["bytes_up"]
        per_round[method] = metrics[1]["bytes_down_by_client"]["client-0"]
    # Round 2's downlink: Fed-SB's R̄ is the smallest; FedEx adds a residual and FLoRA sends
    # the three clients' stacked factors, so both exceed FedIT's plain A, B.
    assert per_round["fedsb"] < per_round["ffa-lora"] < per_round["fedit"]
    assert per_round["fedex-lora"] > per_round["fedit"]
    assert per_round["flora"] > 2 * per_round["fedit"] - 4 * HEAD
    assert runs["fedsb"].summary["bytes_setup"] > 0  # the one-time B/A broadcast
    assert runs["fedit"].summary["bytes_setup"] == 0
    # Head-only: no adapter, no broadcast; each message is the float32 head (plus the
    # safetensors header), the same both ways and for every client.
    assert runs["head-only"].summary["bytes_setup"] == 0
    for m in _metrics(runs["head-only"].run_dir):
        (up,) = set(m["bytes_up_by_client"].values())
        assert set(m["bytes_down_by_client"].values()) == {up}
        assert 4 * HEAD < up < 4 * HEAD + 512


def test_partition_report_written(runs):
    with open(os.path.join(runs["fedsb"].run_dir, "partition.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["spec"] == "iid"
    assert sum(c["records"] for c in report["clients"].values()) == 240


def test_dirichlet_run_and_resume_of_a_folding_method(tmp_path):
    config = RunConfig(**{**SMALL, "epsilon": 3.0, "method": "fedex-lora",
                          "partition": "dirichlet:0.5", "out": str(tmp_path / "fx")})
    first = run_federation(config, progress=False, stop_after_rounds=1)
    assert first.status == "interrupted"
    resumed = run_federation(config, resume=True, progress=False)
    uninterrupted = run_federation(RunConfig(**{**config.to_dict(), "out": str(tmp_path / "u")}),
                                   progress=False)
    assert resumed.status == "completed"
    # Seeded: the resumed run must equal the uninterrupted one, folded base weights included.
    assert resumed.summary["test_accuracy"] == uninterrupted.summary["test_accuracy"]
    assert resumed.summary["test_loss"] == pytest.approx(uninterrupted.summary["test_loss"],
                                                         rel=1e-6)
    with open(os.path.join(resumed.run_dir, "partition.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["spec"] == "dirichlet:0.5"
    assert all(c["records"] >= SMALL["batch_size"] for c in report["clients"].values())


def test_central_reference_is_one_pooled_client(tmp_path):
    result = _run(tmp_path, "central-sb", rounds=1)
    assert result.summary["clients"] == {"central": 240}
    ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
    assert ledger.clients == ["central"]


def test_head_only_runs_non_privately(tmp_path):
    """ε = ∞ (a sweep's reference column) with no adapter at all: only the head moves."""
    config = RunConfig(**{**SMALL, "no_dp": True, "method": "head-only", "rounds": 1,
                          "local_steps": 1, "out": str(tmp_path / "h")})
    result = run_federation(config, progress=False)
    assert result.status == "completed" and result.summary["noise_multiplier"] == 0.0
    assert result.summary["trainable_parameters"] == HEAD
    per_client = result.summary["bytes_up"] / 3
    assert 4 * HEAD < per_client < 4 * HEAD + 512  # the float32 head and its header


def test_rank_heterogeneous_fedsb_run(tmp_path):
    result = _run(tmp_path, "fedsb", client_ranks=(1, 2, 4), rounds=1)
    up = _metrics(result.run_dir)[0]["bytes_up_by_client"]
    assert up["client-0"] < up["client-1"] < up["client-2"]


@pytest.mark.parametrize("overrides, message", [
    ({"method": "fedavg"}, "method='fedavg' is not one of"),
    ({"partition": "dirichlet:0"}, "alpha=0.0 must be > 0"),
    ({"partition": "shards:2"}, "kind 'shards' is not one of"),
    ({"client_ranks": (1, 2, 8)}, "client rank 8 .* must be an integer in 1..4"),
    ({"client_ranks": (1, 2)}, "has 2 entries for clients=3"),
    ({"client_ranks": (1, 2, 4), "method": "fedit"}, "needs method fedsb, not method='fedit'"),
    ({"method": "ffa-lora", "init": "gradient-svd"}, "builds LoRA-SB factors"),
    ({"method": "head-only", "init": "gradient-svd"}, "has none"),
    ({"method": "head-only", "train_head": False}, "needs --task sequence-classification"),
    ({"method": "central-lora", "partition": "dirichlet:0.3"}, "pooled data"),
])
def test_bad_method_settings(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{**SMALL, "epsilon": 3.0, "out": str(tmp_path / "x"), **overrides})
    assert not (tmp_path / "x").exists()


def test_a_partition_leaving_a_client_short_fails_before_spending(tmp_path):
    config = RunConfig(**{**SMALL, "epsilon": 3.0, "partition": "dirichlet:0.01",
                          "batch_size": 70, "out": str(tmp_path / "short")})
    with pytest.raises(ConfigError, match="fewer than 70 records"):
        run_federation(config, progress=False)
    assert not (tmp_path / "short").exists()


def test_each_method_gets_its_own_tuned_learning_rate_unless_told():
    from fedsb_dp.methods import METHODS

    for name, (cls, _) in METHODS.items():
        config = RunConfig(epsilon=3.0, method=name)
        assert config.learning_rate == cls.default_learning_rate
        assert config.to_dict()["learning_rate"] == cls.default_learning_rate  # recorded
        assert RunConfig(epsilon=3.0, method=name, learning_rate=0.5).learning_rate == 0.5
    # R behind orthonormal B, A needs larger steps than LoRA factors (docs/benchmarks.md)
    assert RunConfig(epsilon=3.0).learning_rate > RunConfig(epsilon=3.0,
                                                            method="fedit").learning_rate
    with pytest.raises(ConfigError, match="learning_rate=0 must be > 0"):
        RunConfig(epsilon=3.0, learning_rate=0)
    # On a decoder Fed-SB takes its measured decoder step; the others keep theirs.
    assert RunConfig(epsilon=3.0, task="causal-lm").learning_rate == 0.1
    assert RunConfig(epsilon=3.0, task="causal-lm", method="fedit").learning_rate == (
        RunConfig(epsilon=3.0, method="fedit").learning_rate)
    saved = RunConfig(epsilon=3.0, method="ffa-lora").to_dict()
    assert RunConfig.from_dict(saved) == RunConfig(epsilon=3.0, method="ffa-lora")


def test_rank_one_fedsb_runs(tmp_path):
    """r = 1 leaves B as an m×1 column whose last stride is not 1; the frozen-tensor digests
    must still hash it (they once refused it with a dtype-view error)."""
    result = _run(tmp_path, "fedsb", rank=1, rounds=1)
    assert result.status == "completed"


# End-to-end runs of the real offline model: the fast subset (-m "not slow") skips them.
pytestmark = pytest.mark.slow
