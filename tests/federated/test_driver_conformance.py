"""Both drivers run one protocol: the same small runs, in-process and through the Flower
strategy and ClientApp (messages delivered in-process by the fake grid of
``test_flower_strategy``), give bit-identical aggregates, ledgers and ε for every method and
both DP levels."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from fake_grid import FakeGrid, _task_identity  # noqa: E402, F401
from safetensors.torch import load_file  # noqa: E402
from tiny_decoder import save_tiny_decoder  # noqa: E402

from fedsb_dp.federated.inprocess import run_federation  # noqa: E402
from fedsb_dp.federated.run_config import RunConfig  # noqa: E402
from fedsb_dp.flower.run_config import FlowerOptions  # noqa: E402
from fedsb_dp.flower.server_app import run_server  # noqa: E402

TINY = dict(max_train_records=120, max_eval_records=16, clients=2, rounds=2, local_steps=1,
            batch_size=8, max_length=16, rank=4, seed=5, epsilon=8.0, accountant="rdp",
            init="random-orthonormal")

CASES = {
    "fedsb": {},
    "fedit": {"method": "fedit"},
    "ffa-lora": {"method": "ffa-lora"},
    "fedex-lora": {"method": "fedex-lora"},
    "flora": {"method": "flora"},
    "head-only": {"method": "head-only"},
    "fedsvd": {"method": "fedsvd"},  # the new A travels in the base record every round
    "rolora": {"method": "rolora"},  # round 1 trains B, round 2 A: both phases
    "rank-heterogeneous": {"client_ranks": (2, 4)},
    "client-level": {"dp_level": "client", "epsilon": 30.0},
}


def _ledger_body(path: str) -> dict:
    document = json.loads(open(path).read())
    body = document["body"] if "body" in document else document
    for release in body.get("releases", []):
        release.pop("reservation", None)
    return {k: v for k, v in body.items() if k not in ("pending",)}


def _metrics(out: str) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_inprocess_and_flower_drivers_agree(tmp_path, case):
    _assert_drivers_agree(tmp_path, CASES[case])


@pytest.mark.slow
def test_drivers_agree_on_a_causal_lm_run(tmp_path):
    # A tiny random decoder saved like a downloaded one: every node loads it by path.
    model = save_tiny_decoder(str(tmp_path / "decoder"))
    _assert_drivers_agree(tmp_path, {"task": "causal-lm", "model": model, "max_length": 24,
                                     "max_eval_records": 6})


def _assert_drivers_agree(tmp_path, overrides: dict) -> None:
    config = RunConfig(**{**TINY, **overrides, "out": str(tmp_path / "inprocess")})
    local = run_federation(config, progress=False)
    flower_config = RunConfig.from_dict({**config.to_dict(), "out": str(tmp_path / "flower")})
    # Each node keeps its own ledger; a client-level node must opt in to trusting the server.
    grid = FakeGrid(config.clients, state_dir=str(tmp_path / "nodes"),
                    node_config={"accept-client-level": "true"}
                    if config.dp_level == "client" else None)
    remote = run_server(grid, flower_config, FlowerOptions(round_timeout=60,
                                                           node_wait_timeout=5))
    assert local.status == remote["status"] == "completed"
    a = load_file(os.path.join(local.run_dir, "checkpoint.safetensors"))
    b = load_file(os.path.join(flower_config.out, "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert local.summary["privacy"] == remote["privacy"]
    assert local.summary["noise_multiplier"] == remote["noise_multiplier"]
    assert _metrics(local.run_dir) == _metrics(flower_config.out)
    for name in ("bytes_setup", "bytes_up", "bytes_down", "test_accuracy"):
        assert local.summary[name] == remote[name], name
    local_ledger = json.loads(open(os.path.join(local.run_dir, "ledger.json")).read())
    remote_ledger = json.loads(open(os.path.join(flower_config.out, "ledger.json")).read())
    assert _strip(local_ledger) == _strip(remote_ledger)


@pytest.mark.slow
def test_a_client_level_run_needs_the_nodes_consent(tmp_path):
    config = RunConfig(**{**TINY, **CASES["client-level"], "rounds": 1,
                          "out": str(tmp_path / "flower")})
    summary = run_server(FakeGrid(config.clients, state_dir=str(tmp_path / "nodes")), config,
                         FlowerOptions(round_timeout=60, node_wait_timeout=5))
    # Both nodes refused; the round's noise-only release is still charged and aggregated.
    # Who answered is operator-only under client-level DP (the cohort is secret).
    rows = [json.loads(line) for line in open(os.path.join(config.out, "operator.jsonl"))
            if json.loads(line)["kind"] == "round"]
    assert "dropped" not in _metrics(config.out)[0]
    assert all("refuses client-level DP" in why for why in rows[0]["dropped"].values())
    assert rows[0]["valid"] == [] and summary["rounds_completed"] == 1


def _strip(document: dict) -> str:
    text = json.dumps(document, sort_keys=True)
    # Reservation ids are random per run; everything else must agree.
    import re

    return re.sub(r'"[0-9a-f]{32}"', '"id"', re.sub(r'"sha256": "[0-9a-f]{64}"', "", text))


class KilledGrid(FakeGrid):
    """A fake grid whose server process dies while round ``kill_at`` is out."""

    def __init__(self, *args, kill_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train" and int(
                messages[0].metadata.group_id) == self.kill_at:
            raise KeyboardInterrupt("server killed mid-run")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.slow
def test_a_flower_run_killed_mid_run_resumes(tmp_path):
    options = FlowerOptions(round_timeout=60, node_wait_timeout=5)
    values = {**TINY, "rounds": 3, "method": "ffa-lora"}
    whole = RunConfig(**{**values, "out": str(tmp_path / "whole")})
    run_server(FakeGrid(2, state_dir=str(tmp_path / "n1")), whole, options)
    killed = RunConfig(**{**values, "out": str(tmp_path / "killed")})
    with pytest.raises(KeyboardInterrupt):
        run_server(KilledGrid(2, state_dir=str(tmp_path / "n2"), kill_at=3), killed, options)
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = run_server(FakeGrid(2, state_dir=str(tmp_path / "n2")), killed,
                         dataclasses.replace(options, resume=True))
    # Round 3 was reserved when the server died: it stays charged, and re-running it would
    # pass the target, so the resumed run stops on budget with rounds 1-2 intact.
    assert resumed["status"] == "stopped-budget" and resumed["uncommitted_rounds"] == [3]
    assert resumed["rounds_completed"] == 2
    a = load_file(str(tmp_path / "killed" / "checkpoint.safetensors"))
    rows = _metrics(str(tmp_path / "whole"))[:2]
    assert _metrics(str(tmp_path / "killed")) == rows
    assert a.keys() == load_file(str(tmp_path / "whole" / "checkpoint.safetensors")).keys()


@pytest.mark.slow
def test_a_flower_run_killed_between_rounds_resumes_to_the_same_model(tmp_path, monkeypatch):
    from fedsb_dp.flower import server_app
    from fedsb_dp.flower.strategy import ProtocolStrategy

    class DiesBeforeRound2(ProtocolStrategy):
        def configure_train(self, server_round, arrays, config, grid):
            if server_round == 2:
                raise KeyboardInterrupt("server killed between rounds")
            return super().configure_train(server_round, arrays, config, grid)

    options = FlowerOptions(round_timeout=60, node_wait_timeout=5)
    values = {**TINY, "rounds": 2, "method": "fedex-lora"}
    whole = RunConfig(**{**values, "out": str(tmp_path / "whole")})
    run_server(FakeGrid(2, state_dir=str(tmp_path / "n1")), whole, options)
    killed = RunConfig(**{**values, "out": str(tmp_path / "killed")})
    monkeypatch.setattr(server_app, "ProtocolStrategy", DiesBeforeRound2)
    with pytest.raises(KeyboardInterrupt):
        run_server(FakeGrid(2, state_dir=str(tmp_path / "n2")), killed, options)
    monkeypatch.setattr(server_app, "ProtocolStrategy", ProtocolStrategy)
    resumed = run_server(FakeGrid(2, state_dir=str(tmp_path / "n2")), killed,
                         dataclasses.replace(options, resume=True))
    assert resumed["status"] == "completed" and resumed["rounds_completed"] == 2
    assert resumed["uncommitted_rounds"] == []
    a = load_file(str(tmp_path / "whole" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint.safetensors"))
    for key in a:  # the resumed round draws the same seeded streams: the same model
        assert torch.equal(a[key], b[key]), key
    assert resumed["privacy"] == json.loads(
        (tmp_path / "whole" / "summary.json").read_text())["privacy"]
