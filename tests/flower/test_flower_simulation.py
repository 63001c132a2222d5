"""``fedsb-dp run --engine flower-sim``: the Flower app on Flower's simulation engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from accounting import PrivacyLedger  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_cli_flower_simulation(tmp_path):
    out = tmp_path / "sim"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must be short
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_TMPDIR": ray_tmp, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FEDSB_DP_NODE_DIR": str(tmp_path / "nodes")}
    try:
        run = subprocess.run(
            [str(BIN / "fedsb-dp"), "run", "--engine", "flower-sim", "--epsilon", "8",
             "--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "8",
             "--max-length", "16", "--rank", "4", "--max-train-records", "120",
             "--max-eval-records", "16", "--accountant", "rdp", "--init",
             "random-orthonormal", "--out", str(out)],
            env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=900)  # ~50 s on a quiet 2-core box; generous for a loaded one
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Run completed" in run.stdout and "per-client ε" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["rounds_aggregated"] == 1
    ledger = PrivacyLedger.load(str(out / "ledger.json"))
    assert {c: ledger.steps(c) for c in ledger.clients} == {"client-0": 1, "client-1": 1}
    assert 0 < summary["privacy"]["epsilon"] <= 8
    # Every simulated node kept its own ledger, charging what the server charged it.
    node_ledgers = sorted((tmp_path / "nodes").glob("run-*/client-*.ledger.json"))
    assert [p.name for p in node_ledgers] == ["client-0.ledger.json", "client-1.ledger.json"]
    for path in node_ledgers:
        node = PrivacyLedger.load(str(path))
        (cid,) = node.clients
        assert node.steps(cid) == 1 and node.pending == []
        assert node.client_event(cid) == ledger.client_event(cid)
