"""Gemma-3-270M on the CPU: conversion, reload, memory and one R-only step.

Each phase runs in its own process so its peak RSS (VmHWM) is its own:

* ``convert``   join the packaged GGUF pieces, dequantise, save safetensors (into a temporary
  cache, so the user's cache is untouched; only with ``--convert``, about a minute or more);
* ``load``      load the converted cache (``load_causal_lm("gemma-270m")``);
* ``r-only``    LoRA-SB adapters (rank 16, q/k/v/o/gate/up/down, W0-SVD init) and one
  forward + backward + AdamW step on batch × seq real review tokens, with the loss on the last
  ``--loss-positions`` positions only: the hidden states there are gathered *before* the
  262k-vocabulary head, so the head's logits exist for those positions only;
* ``r-only-dp`` the same under Opacus (GradSampleModule hooks + DPOptimizer).

Step times are medians over ``--repeats`` steps after one warm-up.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gemma_memory.py [--convert]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PHASES = ("convert", "load", "r-only", "r-only-dp")


def _peak_gb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec.
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1e6


def _batch(tokenizer, size: int, seq: int):
    from fedsb_dp.data import load_text_classification

    texts = list(load_text_classification().train["text"].head(size))
    texts = [(t + " ") * 20 for t in texts]  # long enough to fill seq tokens
    return tokenizer(texts, max_length=seq, truncation=True, padding="max_length",
                     return_tensors="pt")


def _last_positions_loss(model, batch, positions: int):
    """Mean next-token loss on the last ``positions`` positions; the head sees only those."""
    import torch

    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(hidden[:, -positions - 1:-1])  # batch × positions × vocab
    targets = batch["input_ids"][:, -positions:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _phase(name: str, args: argparse.Namespace) -> dict:
    import torch

    from fedsb_dp.models import load_causal_lm

    if name == "convert":
        from fedsb_dp.gguf_models import GEMMA_3_270M, resolve_gguf_model

        started = time.perf_counter()
        resolve_gguf_model(GEMMA_3_270M)  # FEDSB_DP_CACHE points at a temporary cache
        return {"seconds": time.perf_counter() - started, "peak_gb": _peak_gb()}
    started = time.perf_counter()
    loaded = load_causal_lm("gemma-270m")
    load_seconds = time.perf_counter() - started
    model = loaded.model
    row = {"seconds": load_seconds, "peak_gb": _peak_gb(),
           "parameters": sum(p.numel() for p in model.parameters())}
    if name == "load":
        return row
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedsb_dp.adapters import find_target_modules, w0_svd_init
    from fedsb_dp.adapters.config import default_targets
    from fedsb_dp.methods import FedSB

    targets = find_target_modules(model, default_targets(model.config.model_type),
                                  rank=args.rank)
    # A causal LM has no classification head: only R trains.
    FedSB(rank=args.rank, train_head=False).inject(
        model, targets, generator=torch.Generator().manual_seed(0),
        factors=w0_svd_init(targets, rank=args.rank).factors)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    row["trainable"] = sum(p.numel() for p in params)
    batch = _batch(loaded.tokenizer, args.batch, args.seq)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    if name == "r-only-dp":
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        model = wrapped._module  # hooks sit on the submodules: calling them directly records
        optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=args.batch)
    times = []
    for _ in range(args.repeats + 1):
        started = time.perf_counter()
        _last_positions_loss(model, batch, args.loss_positions).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    row.update(step_seconds=statistics.median(times[1:]), peak_gb=_peak_gb())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert", action="store_true",
                        help="also time a fresh conversion (into a temporary cache)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--loss-positions", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gemma_memory.json")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args)))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for phase in PHASES if args.convert else PHASES[1:]:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            if phase == "convert":
                env["FEDSB_DP_CACHE"] = scratch
            command = [sys.executable, __file__, "--phase", phase] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("batch", "seq", "loss_positions", "rank", "repeats")]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            rows[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nGemma-3-270M, batch {args.batch} × seq {args.seq}, loss on the last "
          f"{args.loss_positions} positions, rank {args.rank}")
    print(f"{'phase':10s} {'seconds':>8s} {'step s':>7s} {'peak GB':>8s} {'params':>12s} "
          f"{'trainable':>10s}")
    for phase, row in rows.items():
        print(f"{phase:10s} {row['seconds']:8.1f} {row.get('step_seconds', float('nan')):7.2f} "
              f"{row['peak_gb']:8.2f} {row.get('parameters', 0):12,d} "
              f"{row.get('trainable', 0):10,d}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "phase"},
                   "phases": rows}, fh, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
