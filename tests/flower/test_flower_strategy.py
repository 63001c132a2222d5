"""The Flower adapters without a SuperLink: run-config mapping, wire format, and the server's
handling of clients that die or send bad replies (a fake in-process Grid)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from fake_grid import FakeGrid, _task_identity  # noqa: E402, F401
from flwr.app import Message, RecordDict  # noqa: E402

from accounting import PrivacyLedger  # noqa: E402
from fedsb_dp.errors import ConfigError  # noqa: E402
from fedsb_dp.federated.run_config import RunConfig  # noqa: E402
from fedsb_dp.flower import client_app, server_app  # noqa: E402
from fedsb_dp.flower.common import check_supported, records_to_update  # noqa: E402
from fedsb_dp.flower.run_config import FlowerOptions, from_flower, to_flower  # noqa: E402
from fedsb_dp.flower.server_app import run_server  # noqa: E402
from fedsb_dp.flower.strategy import ProtocolStrategy  # noqa: E402

TINY = dict(max_train_records=120, max_eval_records=16, clients=2, rounds=3, local_steps=1,
            batch_size=8, max_length=16, rank=4, seed=11, epsilon=8.0, accountant="rdp",
            init="random-orthonormal")


def test_run_config_round_trip_and_errors():
    config = RunConfig(epsilon=2.0, targets=("query", "value"), seed=3, max_train_records=9)
    assert from_flower(to_flower(config))[0] == config
    values = to_flower(RunConfig(epsilon=1.0))
    assert from_flower({**values, "seed": ""})[0].seed is None
    assert from_flower({**values, "no-dp": True})[0].private is False
    with pytest.raises(ConfigError, match="unknown run-config key"):
        from_flower({**values, "num-server-rounds": 3})
    with pytest.raises(ConfigError, match="round_timeout=0"):
        from_flower({**values, "round-timeout": 0})


@pytest.mark.parametrize("change, match", [
    ({"init": "gradient-svd", "init_source": "dp"}, "data-free"),
    ({"init": "gradient-svd", "init_source": "public", "init_data": "public.csv"}, "data-free"),
    ({"method": "central-sb"}, "pools every record"),
])
def test_unsupported_settings_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        check_supported(RunConfig(epsilon=1.0, **change))


def test_malformed_reply_is_a_config_error():
    with pytest.raises(ConfigError, match="malformed train reply"):
        records_to_update(RecordDict())


def _wrong_steps(reply: Message) -> Message:
    reply.content.config_records["privacy"]["steps"] = 7
    return reply


def _run(tmp_path, name, faults, **overrides):
    config = RunConfig(**{**TINY, **overrides, "out": str(tmp_path / name)})
    grid = FakeGrid(config.clients, faults, state_dir=str(tmp_path / f"{name}-nodes"))
    summary = run_server(grid, config, FlowerOptions(round_timeout=60, node_wait_timeout=5))
    out = str(tmp_path / name)
    ledger = PrivacyLedger.load(os.path.join(out, "ledger.json"))
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return summary, ledger, metrics, grid


def test_dead_and_lying_clients_are_charged_and_the_run_continues(tmp_path):
    summary, ledger, metrics, grid = _run(
        tmp_path, "run", {(2, 1): "raise", (3, 1): _wrong_steps})
    assert summary["status"] == "completed"
    # Round 2: client-1 died after receiving instructions; client-0 alone is aggregated.
    assert metrics[1]["aggregated"] and metrics[1]["valid"] == ["client-0"]
    assert "client crashed" in metrics[1]["dropped"]["client-1"]
    # Round 3: client-1 claims 7 steps; the reply is rejected and the round not aggregated.
    assert not metrics[2]["aggregated"] and "7 steps" in metrics[2]["rejected"]["client-1"]
    assert summary["rounds_failed"] == [3] and summary["rounds_aggregated"] == 2
    # Everyone who was sent instructions is charged for every round, replies or not.
    assert {c: ledger.steps(c) for c in ledger.clients} == {"client-0": 3, "client-1": 3}
    assert ledger.pending == []
    assert 0 < summary["privacy"]["epsilon"] <= TINY["epsilon"]
    assert [k for k, _ in grid.sent].count("train") == 6
    # The checkpoint is the last aggregated R̄ (round 2), untouched by the rejected round.
    assert os.path.exists(tmp_path / "run" / "checkpoint.safetensors")


def test_client_level_counts_a_rejected_reply_as_zero_and_releases_nothing_of_it(
        tmp_path, monkeypatch):
    """Under client-level DP the cohort is secret: a malformed reply must not change what is
    published (no failed round, no missing metric), only the operator log may name it."""
    monkeypatch.setenv("FEDSB_DP_ACCEPT_CLIENT_LEVEL", "1")
    summary, ledger, metrics, _ = _run(tmp_path, "client", {(2, 1): _wrong_steps},
                                       dp_level="client", epsilon=30.0)
    assert [m["aggregated"] for m in metrics] == [True, True, True]
    assert all(m["validation_accuracy"] is not None for m in metrics)
    assert summary["rounds_failed"] == [] and summary["rounds_aggregated"] == 3
    assert all("rejected" not in m and "participants" not in m for m in metrics)
    assert [sorted(m) for m in metrics[1:]] == [sorted(metrics[0])] * 2
    operator = [json.loads(line) for line in open(tmp_path / "client" / "operator.jsonl")]
    rounds = [line for line in operator if line["kind"] == "round"]
    assert "7 steps" in rounds[1]["rejected"]["client-1"]
    assert rounds[1]["valid"] == ["client-0"]
    assert ledger.pending == []


def test_too_few_replies_fail_the_round_cleanly(tmp_path):
    summary, ledger, metrics, _ = _run(tmp_path, "strict", {(1, 0): "raise"}, rounds=2,
                                       min_clients=2)
    assert [m["aggregated"] for m in metrics] == [False, True]
    assert metrics[0]["dropped"] and metrics[0]["validation_accuracy"] is None
    assert summary["status"] == "completed" and summary["rounds_failed"] == [1]
    assert {c: ledger.steps(c) for c in ledger.clients} == {"client-0": 2, "client-1": 2}


def test_a_node_with_other_factors_is_refused_at_setup(tmp_path, monkeypatch):
    original = client_app.handle_query

    def lying_query(message, context):
        reply = original(message, context)
        if context.node_config["partition-id"] == 1:
            reply.content.config_records["client"]["fingerprint"] = "0" * 64
        return reply

    monkeypatch.setattr(client_app, "handle_query", lying_query)
    with pytest.raises(Exception, match="derived frozen factors"):
        _run(tmp_path, "mismatch", {}, rounds=1)
    assert not (tmp_path / "mismatch" / "ledger.json").exists()  # nothing spent or written
    assert torch.get_num_threads() >= 1


def test_the_flower_app_config_is_the_default_run():
    """`flwr run .` without overrides must run what `fedsb-dp run --epsilon E` runs."""
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        app = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    config, options = from_flower(app)
    assert config == RunConfig(epsilon=config.epsilon)
    assert options == FlowerOptions(round_timeout=app["round-timeout"],
                                    node_wait_timeout=app["node-wait-timeout"])


# ---------------------------------------------------------------- nodes own their privacy
class HalfSigmaStrategy(ProtocolStrategy):
    """A server that announces the plan but sends σ/2 to every node."""

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            record = message.content.config_records["round"]
            for key in ("noise-multiplier", "local-noise-multiplier"):
                record[key] = float(record[key]) / 2
        return messages


class ExtraRoundStrategy(ProtocolStrategy):
    """A server that announces ``rounds`` to the nodes and runs one round more."""

    ledger_dir = None  # where the test's nodes keep their ledgers
    node_ledgers: dict[str, bytes] = {}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        protocol = self.protocol
        protocol.config = dataclasses.replace(protocol.config, rounds=protocol.config.rounds + 1)
        protocol.guard.target_epsilon = math.inf  # and ignores its own budget guard

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == self.protocol.config.rounds:  # the nodes' ledgers before the extra round
            for path in self.ledger_dir.glob("run-1/*.ledger.json"):
                ExtraRoundStrategy.node_ledgers[path.name] = path.read_bytes()
        return super().configure_train(server_round, arrays, config, grid)


def _node_ledger(tmp_path, name, cid):
    return PrivacyLedger.load(str(tmp_path / f"{name}-nodes" / "run-1" / f"{cid}.ledger.json"))


def test_nodes_refuse_half_the_calibrated_sigma(tmp_path, monkeypatch):
    monkeypatch.setattr(server_app, "ProtocolStrategy", HalfSigmaStrategy)
    summary, ledger, metrics, _ = _run(tmp_path, "half", {}, rounds=1)
    assert not metrics[0]["aggregated"] and summary["rounds_failed"] == [1]
    for cid in ("client-0", "client-1"):
        reason = metrics[0]["dropped"][cid]
        assert "NodeRefusalError" in reason and "refuses noise multiplier" in reason, reason
        assert f"needs σ ≥ {summary['noise_multiplier']:.6g}" in reason
    # Nothing trained, nothing charged or pinned on the nodes; the server stays charged.
    assert not (tmp_path / "half-nodes").exists()
    assert {c: ledger.steps(c) for c in ledger.clients} == {"client-0": 1, "client-1": 1}


def test_nodes_refuse_an_extra_round_and_keep_their_own_ledgers(tmp_path, monkeypatch):
    monkeypatch.setattr(ExtraRoundStrategy, "ledger_dir", tmp_path / "extra-nodes")
    monkeypatch.setattr(ExtraRoundStrategy, "node_ledgers", {})
    monkeypatch.setattr(server_app, "ProtocolStrategy", ExtraRoundStrategy)
    summary, ledger, metrics, _ = _run(tmp_path, "extra", {}, rounds=1)
    assert [m["aggregated"] for m in metrics] == [True, False]
    for cid in ("client-0", "client-1"):
        assert "refuses round 2: the plan has rounds 1..1" in metrics[1]["dropped"][cid]
        node = _node_ledger(tmp_path, "extra", cid)
        # The node charged exactly its honest round, with the server's own event ...
        assert node.steps(cid) == 1 and node.pending == []
        server_entries = [e for e in ledger.to_json_dict()["body"]["entries"]
                          if e["client"] == cid]
        node_entries = node.to_json_dict()["body"]["entries"]
        assert [e["event"] for e in node_entries] == [server_entries[0]["event"]]
        assert node.metadata["noise_multiplier"] == summary["noise_multiplier"]
        # ... and the refused round left its ledger byte for byte as it was.
        path = tmp_path / "extra-nodes" / "run-1" / f"{cid}.ledger.json"
        assert path.read_bytes() == ExtraRoundStrategy.node_ledgers[path.name]
    # The server charged both rounds it sent (it cannot know what the nodes did).
    assert {c: ledger.steps(c) for c in ledger.clients} == {"client-0": 2, "client-1": 2}


def test_a_node_with_a_stricter_epsilon_refuses_the_federations_sigma(tmp_path):
    config = RunConfig(**{**TINY, "rounds": 1, "out": str(tmp_path / "strict-eps")})
    grid = FakeGrid(config.clients, state_dir=str(tmp_path / "nodes"),
                    node_config={"target-epsilon": 2.0})
    run_server(grid, config, FlowerOptions(round_timeout=60, node_wait_timeout=5))
    metrics = [json.loads(x) for x in open(tmp_path / "strict-eps" / "metrics.jsonl")]
    assert "for ε=2" in metrics[0]["dropped"]["client-0"]


# End-to-end runs of the real offline model: the fast subset (-m "not slow") skips them.
pytestmark = pytest.mark.slow
