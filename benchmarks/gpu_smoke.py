"""GPU smoke test: one Fed-SB training step with and without DP, on your device, in one command.

For each model (the offline MiniLM classifier; Gemma-3-270M as a causal LM when its offline
copy is installed) the script loads the model in ``--dtype`` on ``--device``, injects LoRA-SB
adapters (R in float32), and times ``--steps`` steps of plain AdamW on R and of Opacus DP-SGD
(per-sample gradients, clipping, float32 noise drawn on the device). It prints one row per
model and mode: step time (median) and peak memory — ``torch.cuda.max_memory_allocated`` on a
GPU, the process's peak RSS on the CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_smoke.py                # auto: GPU if any
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_smoke.py --device cpu --steps 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_smoke.py --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedsb_dp.adapters import find_target_modules, w0_svd_init
from fedsb_dp.adapters.config import default_targets
from fedsb_dp.adapters.inject import trainable_modules
from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.devices import resolve_device, resolve_dtype, to_device, train_in_float32
from fedsb_dp.errors import ConfigError
from fedsb_dp.losses import example_losses
from fedsb_dp.methods import FedSB
from fedsb_dp.models import CAUSAL_LM, SEQUENCE_CLASSIFICATION, load_model

#: (row name, model alias, task).
MODELS = (("MiniLM", "minilm", SEQUENCE_CLASSIFICATION), ("Gemma-270M", "gemma-270m", CAUSAL_LM))


def _peak_rss_gb() -> float:
    # VmHWM: this process's own peak resident set (ru_maxrss would include a parent's).
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1e6


def _batch(tokenizer, task: str, size: int, seq: int) -> dict[str, torch.Tensor]:
    frame = load_text_classification().train.head(size).copy()
    frame["text"] = (frame["text"] + " ") * 40  # long enough to fill seq tokens
    batch = make_collate(tokenizer)(
        [TokenizedDataset(frame, tokenizer, max_length=seq)[i] for i in range(size)])
    if task == CAUSAL_LM:  # next-token targets on every real token
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _model(alias: str, task: str, args: argparse.Namespace, device: torch.device):
    loaded = load_model(alias, task=task, dtype=resolve_dtype(args.dtype))
    model = loaded.model.to(device)
    targets = find_target_modules(model, default_targets(model.config.model_type),
                                  rank=args.rank)
    FedSB(rank=args.rank, train_head=task == SEQUENCE_CLASSIFICATION).inject(
        model, targets, generator=torch.Generator().manual_seed(0),
        factors=w0_svd_init(targets, rank=args.rank).factors)
    train_in_float32(model, trainable_modules(model,
                                              train_head=task == SEQUENCE_CLASSIFICATION))
    return loaded, model.train()


def _time_steps(model, batch, task: str, args: argparse.Namespace, device: torch.device,
                dp: bool) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    runner = GradSampleModule(model, batch_first=True, loss_reduction="mean") if dp else model
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if dp:
        optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=args.batch,
                                generator=torch.Generator(device=device).manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for _ in range(args.steps + 1):  # the first step warms up and is not timed
            started = time.perf_counter()
            example_losses(runner, batch, task=task).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    finally:
        if dp:
            runner._close()
    peak = (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
            else _peak_rss_gb())
    return statistics.median(times[1:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index>")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", default=",".join(m[0] for m in MODELS))
    args = parser.parse_args()
    quiet_expected_warnings()
    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        parser.error(exc.named(f"--device {args.device}"))
    memory = "peak GPU GB" if device.type == "cuda" else "peak RSS GB"
    print(f"device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"base dtype {args.dtype}, R float32, batch {args.batch}, seq {args.seq}, "
          f"rank {args.rank}, median of {args.steps} steps")
    print(f"{'model':12s} {'mode':6s} {'s/step':>8s} {memory:>12s}")
    wanted = args.models.split(",")
    for name, alias, task in MODELS:
        if name not in wanted:
            continue
        try:
            loaded, model = _model(alias, task, args, device)
        except ConfigError as exc:
            reason = str(exc).splitlines()[0][:100]
            print(f"{name:12s} skipped: not installed offline ({reason}…)")
            continue
        batch = to_device(_batch(loaded.tokenizer, task, args.batch, args.seq), device)
        for dp in (False, True):
            seconds, peak = _time_steps(model, batch, task, args, device, dp)
            print(f"{name:12s} {'DP' if dp else 'no DP':6s} {seconds:8.3f} {peak:12.2f}",
                  flush=True)
        del model, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
