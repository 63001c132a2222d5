"""DP overhead: time per step and peak memory of R-only, Fed-SB, LoRA and full fine-tuning.

Variants (default model MiniLM, one fixed batch padded to exactly --seq tokens):

* ``r-only``      LoRA-SB, only R (and head) trained, plain AdamW — the non-private baseline;
* ``fedsb-dp``    the same model under Opacus (GradSampleModule hooks + DPOptimizer);
* ``lora-dp``     LoRA A and B (FedIT's client) under Opacus;
* ``full-dp``     every parameter except the embeddings under Opacus (BERT's position ids are a
  broadcast (1, seq) buffer, for which Opacus cannot form per-sample embedding gradients; the
  Opacus BERT tutorial freezes the embeddings the same way).

Times are measured side by side in one process, interleaved round-robin so machine noise
hits every variant alike; the table gives medians and the ratio to ``r-only``. Peak memory is
measured per variant in its own subprocess (ru_maxrss after the steps, minus after loading),
since a process-wide peak cannot be split between variants.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dp_overhead.py --batch 32 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedsb_dp.adapters import find_target_modules, w0_svd_init
from fedsb_dp.adapters.config import default_targets
from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.losses import example_losses
from fedsb_dp.methods import FedIT, FedSB
from fedsb_dp.models import SEQUENCE_CLASSIFICATION, load_model

VARIANTS = ("r-only", "fedsb-dp", "lora-dp", "full-dp")


def _model(variant: str, rank: int):
    loaded = load_model()
    model = loaded.model
    targets = find_target_modules(model, default_targets("bert"), rank=rank)
    if variant in ("r-only", "fedsb-dp"):
        FedSB(rank=rank).inject(model, targets, generator=torch.Generator().manual_seed(0),
                                factors=w0_svd_init(targets, rank=rank).factors)
    elif variant == "lora-dp":
        FedIT(rank=rank, scaling=2.0).inject(model, targets,
                                             generator=torch.Generator().manual_seed(0))
    else:
        embeddings = set(model.base_model.embeddings.parameters())
        for p in model.parameters():
            p.requires_grad_(p not in embeddings)
    return loaded, model.train()


def _batch(loaded, size: int, seq: int):
    data = load_text_classification()
    frame = data.train.head(size).copy()
    frame["text"] = (frame["text"] + " ") * 40  # long enough to fill --seq tokens
    dataset = TokenizedDataset(frame, loaded.tokenizer, max_length=seq)
    batch = make_collate(loaded.tokenizer)([dataset[i] for i in range(size)])
    assert batch["input_ids"].shape == (size, seq), batch["input_ids"].shape
    return batch


def _stepper(variant: str, rank: int, batch_size: int, seq: int):
    loaded, model = _model(variant, rank)
    batch = _batch(loaded, batch_size, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "r-only":
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        runner = model
    else:
        runner = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.AdamW(params, lr=1e-3), noise_multiplier=1.0,
                                max_grad_norm=0.1, expected_batch_size=batch_size)

    def step() -> None:
        example_losses(runner, batch, task=SEQUENCE_CLASSIFICATION).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def _memory(variant: str, args: argparse.Namespace) -> float:
    """Peak RSS (GB) of a fresh process that loads one variant and runs two steps."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would
    # report the parent's peak; VmHWM belongs to the child's own address space.
    code = (
        "import sys; sys.path.insert(0, 'benchmarks');"
        "import dp_overhead as b;"
        f"step, _ = b._stepper({variant!r}, {args.rank}, {args.batch}, {args.seq});"
        "step(); step();"
        "line = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0];"
        "print(int(line.split()[1]) / 1e6)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", default="benchmarks/results/dp_overhead.json")
    args = parser.parse_args()
    quiet_expected_warnings()
    names = args.variants.split(",")
    steppers = {name: _stepper(name, args.rank, args.batch, args.seq) for name in names}
    for step, _ in steppers.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, (step, _) in steppers.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times[names[0]])
    print(f"\nbatch {args.batch}, seq {args.seq}, rank {args.rank}, {torch.get_num_threads()} "
          f"threads, {platform.machine()}; ratios to {names[0]}")
    print(f"{'variant':10s} {'trainable':>12s} {'median s':>9s} {'min s':>7s} {'ratio':>6s} "
          f"{'peak GB':>8s}")
    rows = []
    for name in names:
        median = statistics.median(times[name])
        peak = None if args.no_memory else _memory(name, args)
        rows.append({"variant": name, "trainable_parameters": steppers[name][1],
                     "median_s": median, "min_s": min(times[name]),
                     "ratio_to_r_only": median / base, "peak_rss_gb": peak,
                     "samples": times[name]})
        print(f"{name:10s} {steppers[name][1]:12,d} {median:9.3f} {min(times[name]):7.3f} "
              f"{median / base:6.2f} {'' if peak is None else f'{peak:8.2f}'}", flush=True)
    print(f"process peak RSS (all variants loaded): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "rows": rows, "machine": platform.platform(),
                   "cpus": os.cpu_count(), "torch": torch.__version__}, fh, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
