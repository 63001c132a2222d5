"""Does a float16 frozen base need loss scaling? Per-example R gradients against float32.

R, its gradients, optimizer state and the DP noise are float32 whatever ``--dtype`` says, but
the backward still passes through the base's half-precision activations, where a small
gradient could underflow (float16's smallest normal number is 6.1e-5, bfloat16 keeps
float32's range). This script computes Opacus' per-example gradients of every R for one
batch of the causal-LM label task with the same weights, factors (W0-SVD of the float32
weights) and batch, the base in float32, bfloat16 and float16, the last also with a static
loss scale (gradients divided by it afterwards), and reports each against float32: the
largest relative error of a per-example gradient, the smallest cosine, the share of exact
zeros (underflow shows up there) and whether every entry is finite.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/half_precision_grads.py \\
        [--models tiny-llama,tiny-gemma3,gemma-270m]

``tiny-llama`` / ``tiny-gemma3`` are the test suite's random two-layer decoders; ``gemma-270m``
needs the opt-in install. Results: ``benchmarks/results/half_precision_grads.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch
from opacus import GradSampleModule

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = (("bfloat16", 1.0), ("float16", 1.0), ("float16", 1024.0), ("float16", 65536.0))


def _model_path(name: str, scratch: str) -> str:
    if not name.startswith("tiny-"):
        return name
    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
    from tiny_decoder import save_tiny_decoder

    return save_tiny_decoder(os.path.join(scratch, name), name.removeprefix("tiny-"))


def measure(name: str, scratch: str, batch_size: int) -> dict:
    """One model's rows (see the module docstring)."""
    from fedsb_dp.adapters.initializers import w0_svd_init
    from fedsb_dp.federated import setup
    from fedsb_dp.federated.run_config import RunConfig
    from fedsb_dp.losses import example_losses

    config = RunConfig(task="causal-lm", model=_model_path(name, scratch), clients=3,
                       max_length=64, max_train_records=600, no_dp=True, rank=16 if
                       name == "gemma-270m" else 4)
    data = setup.load_data(config)
    frames, _ = setup.partition_frames(config, data, partition_seed=0)
    loaded = setup.load_base_model(config, num_labels=data.num_labels)
    task = setup.make_task(config, data)
    client = setup.make_client("client-0", frames["client-0"], config, loaded.tokenizer, task)
    batch = client.collate([client.dataset[i] for i in range(batch_size)])
    factors = w0_svd_init(setup.targets_of(config, loaded.model), rank=config.rank).factors

    def per_example(dtype: torch.dtype, scale: float) -> torch.Tensor:
        model = copy.deepcopy(loaded.model).to(dtype)
        setup.inject(config, setup.make_method(config), model, init_seed=0, factors=factors)
        model.train()
        private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            (example_losses(private, batch, task=config.task).mean() * scale).backward()
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.cat([p.grad_sample.reshape(batch_size, -1).double()
                              for p in params], 1) / scale
        finally:
            private._close()

    reference = per_example(torch.float32, 1.0)
    out = {"per_example_norms_float32": reference.norm(dim=1).tolist(),
           "zero_share_float32": (reference == 0).double().mean().item()}
    for dtype, scale in SETTINGS:
        g = per_example(getattr(torch, dtype), scale)
        finite = bool(torch.isfinite(g).all())
        rel = (g - reference).norm(dim=1) / reference.norm(dim=1)
        cos = (g * reference).sum(1) / (g.norm(dim=1) * reference.norm(dim=1))
        out[f"{dtype} x{scale:g}"] = {
            "finite": finite, "rel_err_max": rel.max().item() if finite else None,
            "cos_min": cos.min().item() if finite else None,
            "zero_share": (g == 0).double().mean().item()}
        print(name, dtype, f"x{scale:g}", json.dumps(out[f"{dtype} x{scale:g}"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-llama,tiny-gemma3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--results", default=os.path.join(HERE, "results",
                                                          "half_precision_grads.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = {name: measure(name, scratch, args.batch) for name in args.models.split(",")}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as fh:
        json.dump({"batch": args.batch, "max_length": 64, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
