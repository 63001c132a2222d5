"""FedSVD and RoLoRA end to end on MiniLM: a run, a resume across rounds, the saved adapter.

(Their Flower path is in test_driver_conformance.py: the same runs through the strategy and
ClientApp give bit-identical checkpoints.)
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.setup import load_base_model, make_method, targets_of

TINY = dict(max_train_records=120, max_eval_records=16, clients=2, rounds=3, local_steps=1,
            batch_size=8, max_length=16, rank=4, seed=5, epsilon=3.0)
MINILM = dict(layers=12, width=384, head=384 * 2 + 2)  # 6 layers × (query, value)


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, rd.METRICS), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedsvd", "rolora"])
def test_run_resume_and_saved_adapter(tmp_path, method):
    config = RunConfig(**{**TINY, "method": method, "out": str(tmp_path / "resumed")})
    first = run_federation(config, progress=False, stop_after_rounds=1)
    assert first.status == "interrupted"
    resumed = run_federation(config, resume=True, progress=False)
    whole = run_federation(RunConfig.from_dict({**config.to_dict(),
                                                "out": str(tmp_path / "whole")}),
                           progress=False)
    assert resumed.status == whole.status == "completed"
    assert resumed.summary["privacy"]["epsilon"] <= 3.0
    # Seeded: resuming after round 1 (FedSVD: A moved; RoLoRA: the A round next) changes
    # nothing, every factor included.
    a = load_file(os.path.join(resumed.run_dir, rd.CHECKPOINT))
    b = load_file(os.path.join(whole.run_dir, rd.CHECKPOINT))
    assert a.keys() == b.keys()
    assert {k for k in a if ".lora_A." in k} and {k for k in a if ".lora_B." in k}
    for key in a:
        assert torch.equal(a[key], b[key]), key

    w, r = MINILM["width"], TINY["rank"]
    # Both train one factor per DP-SGD step: that (and the head) is what the noise covers.
    one_factor = MINILM["layers"] * r * w + MINILM["head"]
    assert whole.summary["noised_parameters"] == one_factor
    assert whole.summary["trainable_parameters"] == (
        one_factor if method == "fedsvd" else one_factor + MINILM["layers"] * r * w)
    up = [m["bytes_up_by_client"]["client-0"] for m in _metrics(whole.run_dir)]
    down = [m["bytes_down_by_client"]["client-0"] for m in _metrics(whole.run_dir)]
    factor = MINILM["layers"] * r * w * 4  # one factor of every layer, float32 bytes
    assert min(up) > factor and max(up) < 2 * factor  # one factor (+ head) goes up
    if method == "fedsvd":
        assert down[1] > 2 * factor  # the new A comes down with B̄ every round
    else:
        assert max(down) < 2 * factor  # RoLoRA: only the averaged factor comes down

    # The final adapter rebuilds the trained model on a fresh base.
    saved = RunConfig.from_dict({**config.to_dict(), "out": whole.run_dir})
    fresh = load_base_model(saved, num_labels=2).model
    make_method(saved).load_adapter(fresh, os.path.join(whole.run_dir, rd.FINAL_ADAPTER),
                                    targets_of(saved, fresh))
    for key, value in b.items():  # the last checkpoint, moved A and head included
        assert torch.equal(fresh.get_parameter(key).detach(), value), key
    if method == "fedsvd":
        for name in lora_layers(fresh):
            A = b[f"{name}.lora_A.weight"].double()
            torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=torch.float64),
                                       rtol=0, atol=1e-5)
