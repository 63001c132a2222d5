"""Time per training step of R-only LoRA-SB on the default model, with and without Opacus.

Both variants run side by side in one process, interleaved, so machine noise hits them alike;
the table reports medians and the ratio. Prints a table and writes JSON.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --batch 32 --seq 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedsb_dp.adapters import SBConfig, find_target_modules, inject_adapters, w0_svd_init
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.losses import example_losses
from fedsb_dp.models import load_model


def _model(rank: int):
    loaded = load_model()
    model = loaded.model
    config = SBConfig(rank=rank)
    targets = find_target_modules(model, config.resolved_targets("bert"), rank=rank)
    inject_adapters(model, w0_svd_init(targets, rank=rank).factors, config)
    return loaded, model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/step_time.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    data = load_text_classification()
    loaded, plain = _model(args.rank)
    _, private = _model(args.rank)
    collate = make_collate(loaded.tokenizer)
    # Pad to exactly --seq tokens so the measured shape is the stated one.
    frame = data.train.head(args.batch).copy()
    frame["text"] = (frame["text"] + " ") * 40
    dataset = TokenizedDataset(frame, loaded.tokenizer, max_length=args.seq)
    batch = collate([dataset[i] for i in range(args.batch)])
    assert batch["input_ids"].shape == (args.batch, args.seq), batch["input_ids"].shape

    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    gsm = GradSampleModule(private, batch_first=True, loss_reduction="mean")
    dp_opt = DPOptimizer(
        torch.optim.AdamW([p for p in private.parameters() if p.requires_grad], lr=1e-3),
        noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=args.batch,
    )

    def step_plain() -> None:
        example_losses(plain, batch, task="sequence-classification").mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def step_private() -> None:
        example_losses(gsm, batch, task="sequence-classification").mean().backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    variants = {"R-only (no DP)": step_plain, "R-only + Opacus hooks (DP)": step_private}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["R-only (no DP)"])
    rows = []
    print(f"\nbatch {args.batch}, seq {args.seq}, rank {args.rank}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'variant':32s} {'median s/step':>14s} {'min':>8s} {'ratio':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_s": median, "min_s": min(values),
                     "ratio_to_no_dp": median / base, "samples": values})
        print(f"{name:32s} {median:14.3f} {min(values):8.3f} {median / base:7.2f}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak RSS of the process: {peak_gb:.2f} GB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "rows": rows, "peak_rss_gb": peak_gb,
                   "machine": platform.platform(), "cpus": os.cpu_count()}, fh, indent=2)


if __name__ == "__main__":
    main()
