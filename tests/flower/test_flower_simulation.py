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


def _flower_sim(tmp_path, *args):
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must be short
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_TMPDIR": ray_tmp, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FEDSB_DP_NODE_DIR": str(tmp_path / "nodes")}
    try:
        # ~50 s on a quiet 2-core box; the timeout is generous for a loaded one.
        return subprocess.run([str(BIN / "fedsb-dp"), "run", "--engine", "flower-sim", *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    {"method": "ffa-lora", "epsilon": 8.0},
    # Client level on the fake grid is in test_driver_conformance; on real Ray it is extended.
    pytest.param({"dp_level": "client", "epsilon": 30.0}, marks=pytest.mark.extended)])
def test_flower_sim_matches_the_in_process_engine(tmp_path, variant):
    """`fedsb-dp run --engine flower-sim --method ffa-lora` (and `--dp-level client`) on real
    Ray actors: the CLI reports the run, every simulated node keeps its own ledger charging
    what the server charged it, and the result matches the in-process engine (seeded);
    simulated nodes consent to client level.

    Ray runs each ClientApp with one thread, so float sums may round differently from the
    two-thread in-process run (measured ≤ 2e-9); the bit-for-bit equality of the drivers is
    checked on the fake grid and on the deployment engine.
    """
    import torch
    from safetensors.torch import load_file

    from fedsb_dp.federated.inprocess import run_federation
    from fedsb_dp.federated.run_config import RunConfig

    settings = dict(clients=2, rounds=1, local_steps=1, batch_size=8,
                    max_length=16, rank=4, max_train_records=120, max_eval_records=16,
                    accountant="rdp", init="random-orthonormal", seed=4, **variant)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    run = _flower_sim(tmp_path, *flags, "--out", str(tmp_path / "sim"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Run completed" in run.stdout
    if "dp_level" not in variant:
        ledger = PrivacyLedger.load(str(tmp_path / "sim" / "ledger.json"))
        assert {c: ledger.steps(c) for c in ledger.clients} == {"client-0": 1, "client-1": 1}
        assert "per-client ε" in run.stdout
        node_ledgers = sorted((tmp_path / "nodes").glob("run-*/client-*.ledger.json"))
        assert [p.name for p in node_ledgers] == ["client-0.ledger.json",
                                                  "client-1.ledger.json"]
        for path in node_ledgers:
            node = PrivacyLedger.load(str(path))
            (cid,) = node.clients
            assert node.steps(cid) == 1 and node.pending == []
            assert node.client_event(cid) == ledger.client_event(cid)
    local = run_federation(RunConfig(**settings, out=str(tmp_path / "local")), progress=False)
    remote = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert remote["engine"] == "flower" and remote["rounds_aggregated"] == 1
    assert remote["privacy"] == local.summary["privacy"]
    a = load_file(str(tmp_path / "sim" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "local" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
