"""Wall time per round: in-process engine vs Flower simulation vs Flower deployment (loopback).

Same settings for all three (2 clients, MiniLM, 240 records, seq 32, batch 16, 2 local steps,
r=4, seed 7). Round time = from sending the round's instructions to the end of the server's
validation pass (engine: difference of ``elapsed_s`` in the operator-only operator.jsonl). Writes
benchmarks/results/flower_round_time.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/flower_round_time.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = dict(epsilon=3.0, clients=2, rounds=2, local_steps=2, batch_size=16, max_length=32,
                rank=4, max_train_records=240, max_eval_records=64, seed=7)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} did not open")


def _operator(run: Path) -> list[dict]:
    """The run's operator-only log (timings never go to the released files)."""
    return [json.loads(x) for x in (run / "operator.jsonl").read_text().splitlines()]


def _round_times(run: Path) -> list[float]:
    return next(line["round_times_s"] for line in _operator(run) if line["kind"] == "summary")


def engine(tmp: Path) -> dict:
    from fedsb_dp.federated.inprocess import run_federation
    from fedsb_dp.federated.run_config import RunConfig

    result = run_federation(RunConfig(**SETTINGS, out=str(tmp / "engine")), progress=False)
    elapsed = [line["elapsed_s"] for line in _operator(Path(result.run_dir))
               if line["kind"] == "round"]
    # elapsed_s is measured from the start of the run, so round 1 also holds the setup
    # (data, model, calibration): only later rounds are clean differences.
    return {"wall_s": result.operator["wall_time_s"], "setup_plus_round_1_s": elapsed[0],
            "round_s": [b - a for a, b in pairwise(elapsed)]}


def simulation(tmp: Path) -> dict:
    from fedsb_dp.federated.run_config import RunConfig
    from fedsb_dp.flower.simulation import run_flower_simulation

    started = time.time()
    result = run_flower_simulation(RunConfig(**SETTINGS, out=str(tmp / "sim")))
    return {"wall_s": time.time() - started, "round_s": _round_times(Path(result.run_dir))}


def deployment(tmp: Path) -> dict:
    home = tmp / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    link = _port()
    processes = []

    def start(*args: str) -> None:
        processes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))

    out = tmp / "deploy"
    try:
        start("flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(link), "--database",
              ":flwr-in-memory-state:")
        _wait(link)
        for i in range(SETTINGS["clients"]):
            port = _port()
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--node-config", f"partition-id={i} num-partitions={SETTINGS['clients']}",
                  "--port", str(port))
            _wait(port)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "b"\n\n[superlink.b]\n'
                                          f'address = "127.0.0.1:{link}"\ninsecure = true\n')
        overrides = " ".join(f"{k.replace('_', '-')}={v}" for k, v in SETTINGS.items())
        started = time.time()
        subprocess.run([str(BIN / "flwr"), "run", str(REPO), "b", "--stream", "--run-config",
                        f"{overrides} out='{out}'"], env=env, cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        wall = time.time() - started
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            process.wait(timeout=20)
    return {"wall_s": wall, "round_s": _round_times(out),
            "note": "wall_s = `flwr run` (FAB build and install, ServerApp setup, rounds)"}


def main() -> None:
    """Run the three engines and write the JSON."""
    with tempfile.TemporaryDirectory(prefix="flbench", dir="/tmp") as tmp:
        tmp_path = Path(tmp)
        results = {"settings": SETTINGS, "cpu_count": os.cpu_count(),
                   "engine": engine(tmp_path), "flower_simulation": simulation(tmp_path),
                   "flower_deployment": deployment(tmp_path)}
    path = REPO / "benchmarks" / "results" / "flower_round_time.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
