"""Integration: a real SuperLink and two SuperNodes on 127.0.0.1 run 2 rounds of private Fed-SB
on the real MiniLM via ``flwr run``; the ledger, ε and the aggregate equal the in-process
engine's on the same seed and partition. Every process started here is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from accounting import PrivacyLedger  # noqa: E402
from fedsb_dp.federated.inprocess import run_federation  # noqa: E402
from fedsb_dp.federated.run_config import RunConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETTINGS = dict(epsilon=3.0, clients=2, rounds=2, local_steps=2, batch_size=16, max_length=32,
                rank=4, max_train_records=240, max_eval_records=64, seed=7)
RUN_TIMEOUT_S = 600  # ~75 s on a quiet 2-core box


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} not open after {timeout} s:\n{log.read_text()[-3000:]}")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (flower-superexec, ClientApp/ServerApp processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group and every descendant by PID, then SIGKILL what is left."""
    pids = []
    for process in processes:
        pids += [process.pid, *_descendants(process.pid)]
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # each was started in its own session
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture()
def flower_env(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           # One intra-op thread per ClientApp process, like the reference run below, so
           # that float reductions happen in the same order and updates match bit for bit.
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return env, home


@pytest.mark.slow
def test_deployment_matches_in_process_engine(tmp_path, flower_env):
    env, home = flower_env
    link_port = _free_port()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        processes.append(process)
        return process, log

    out = tmp_path / "flower-run"
    try:
        link, log = start("superlink", "flower-superlink", "--insecure",
                          "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                          "--port", str(link_port), "--database", ":flwr-in-memory-state:")
        _wait_for_port(link_port, link, log)
        for i in range(SETTINGS["clients"]):
            node_port = _free_port()
            node, log = start(f"supernode-{i}", "flower-supernode", "--insecure",
                              "--superlink", f"127.0.0.1:{link_port}", "--node-config",
                              f"partition-id={i} num-partitions={SETTINGS['clients']} "
                              f"ledger-path='{tmp_path / f'node-{i}.ledger.json'}'",
                              "--port", str(node_port))
            _wait_for_port(node_port, node, log)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        overrides = " ".join(f"{k.replace('_', '-')}={v}" for k, v in SETTINGS.items())
        started = time.time()
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "test", "--stream", "--run-config",
             f"{overrides} out='{out}'"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        deploy_wall = time.time() - started
        assert (out / "summary.json").exists(), (
            f"flwr run exited {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}")
    finally:
        _stop(processes)
    assert all(p.poll() is not None for p in processes)
    assert not [pid for p in processes for pid in _descendants(p.pid)]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flower"
    assert summary["rounds_aggregated"] == 2 and summary["rounds_failed"] == []
    for name in ("config.json", "ledger.json", "metrics.jsonl", "provenance.json",
                 "progress.json", "checkpoint.safetensors", "init_adapter", "final_adapter"):
        assert (out / name).exists(), name

    # The in-process engine on the same settings, seed and partition, one thread as well.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_federation(RunConfig(**SETTINGS, out=str(tmp_path / "engine")),
                                   progress=False)
    finally:
        torch.set_num_threads(threads)
    ref_dir = Path(reference.run_dir)

    ours, theirs = load_file(out / "checkpoint.safetensors"), load_file(
        ref_dir / "checkpoint.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-identical R̄ and head
    flower_ledger = PrivacyLedger.load(str(out / "ledger.json")).to_json_dict()["body"]
    engine_ledger = PrivacyLedger.load(str(ref_dir / "ledger.json")).to_json_dict()["body"]
    for key in ("unit", "dataset_sizes", "target_epsilon", "target_delta", "entries",
                "pending", "metadata"):
        assert flower_ledger[key] == engine_ledger[key], key
    assert summary["privacy"] == reference.summary["privacy"]  # ε, bounds, per client
    # Each node kept its own ledger, charging exactly what the server charged it.
    server_ledger = PrivacyLedger.load(str(out / "ledger.json"))
    for i in range(SETTINGS["clients"]):
        node = PrivacyLedger.load(str(tmp_path / f"node-{i}.ledger.json"))
        assert node.clients == [f"client-{i}"] and node.pending == []
        assert node.client_event(f"client-{i}") == server_ledger.client_event(f"client-{i}")
    assert summary["noise_multiplier"] == reference.summary["noise_multiplier"]
    assert summary["test_accuracy"] == reference.summary["test_accuracy"]
    flower_rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    engine_rounds = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    flower_operator = [json.loads(x) for x in (out / "operator.jsonl").read_text().splitlines()]
    assert [m["epsilon"] for m in flower_rounds] == [m["epsilon"] for m in engine_rounds]
    print(f"\ndeployment: flwr run {deploy_wall:.1f} s, rounds "
          f"{[round(m['round_time_s'], 1) for m in flower_operator if m['kind'] == 'round']} "
          f"s; in-process engine {reference.operator['wall_time_s']:.1f} s")
