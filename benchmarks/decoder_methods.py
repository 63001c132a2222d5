"""Gemma-3-270M, private federated fine-tuning at equal ε: Fed-SB against its baselines.

Each method runs as its own ``fedsb-dp run --task causal-lm`` process on the same CPU-sized
cell (the offline Rotten Tomatoes reviews cast as "Review: …\\nSentiment:" → " fresh" /
" rotten"), so its peak RSS is its own. The table gives the held-out response loss and
perplexity, the exact-match accuracy of greedy generation, ε recomputed from the run's ledger,
bytes per client per round, wall time and peak RSS; a row can carry its own learning rate
and rank (``fedsb:r64@0.003``). Then one more process times a client step of every method with and
without DP side by side on one fixed batch of the cell (interleaved round-robin, so machine
load hits both alike): Opacus per-example gradients + clip + noise (``GradSampleModule`` +
``DPOptimizer``, the client's own optimizer factory) against plain back-propagation + AdamW.
Finally ``fedsb-dp comm`` prints the per-round traffic of every method on the real Gemma-3-270M
configuration. Everything goes to ``benchmarks/results/decoder_methods.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decoder_methods.py \\
        [--methods fedsb,fedsb@0.003,fedsb:r64@0.003,ffa-lora,fedit] [--rounds 3]
        [--timing-repeats 3]

Needs the opt-in Gemma install (``FEDSB_DP_GEMMA=1 bash scripts/install.sh``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CELL = {"task": "causal-lm", "model": "gemma-270m", "epsilon": 3.0, "clients": 3, "rounds": 3,
        "local_steps": 2, "batch_size": 8, "max_length": 64, "max_train_records": 600,
        "max_eval_records": 32, "rank": 16, "seed": 0}
GEMMA_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                            "fixtures", "gemma-3-270m.config.json")


def _split(spec: str) -> tuple[str, int | None, float | None]:
    """``fedsb:r64@0.003`` → ("fedsb", 64, 0.003); ``fedit`` → ("fedit", None, None)."""
    head, _, lr = spec.partition("@")
    method, _, rank = head.partition(":r")
    return method, int(rank) if rank else None, float(lr) if lr else None


def _run(spec: str, out: str, cell: dict) -> dict:
    method, rank, lr = _split(spec)
    # Fed-SB's r×r matrix is tiny at the LoRA baselines' rank; the paper gives it a larger r.
    cell = {**cell, **({"rank": rank} if rank is not None else {})}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in cell.items()]
    if lr is not None:
        flags.append(f"--learning-rate={lr}")
    started = time.time()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "fedsb_dp.cli", "run",
         "--method", method, "--no-progress", *flags, "--out", out],
        capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{spec} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        used_lr = json.load(fh)["config"]["learning_rate"]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        rounds = [json.loads(line) for line in fh if line.strip()]
    per_round = summary["bytes_up"] / (cell["clients"] * max(summary["rounds_completed"], 1))
    return {"method": spec, "rank": cell["rank"], "learning_rate": used_lr,
            "status": summary["status"],
            "test_loss": summary.get("test_loss"),
            "test_perplexity": summary.get("test_perplexity"),
            "exact_match": summary.get("test_accuracy"),
            "validation_loss_per_round": [r.get("validation_loss") for r in rounds],
            "epsilon": summary["privacy"]["epsilon"], "sigma": summary["noise_multiplier"],
            "trainable_parameters": summary["trainable_parameters"],
            "bytes_up_per_client_round": per_round,
            "wall_s": round(time.time() - started, 1),
            "peak_rss_gb": int(done.stderr.strip().splitlines()[-1]) / 1e6}


def _time_method(method: str, loaded, client, batch: dict, cell: dict, sigma: float,
                 repeats: int) -> dict:
    """Median s/step of ``method``'s client with and without DP, interleaved."""
    import torch
    from opacus import GradSampleModule

    from fedsb_dp.federated import setup
    from fedsb_dp.federated.client import LocalTrainingConfig
    from fedsb_dp.federated.run_config import RunConfig
    from fedsb_dp.losses import example_losses

    config = RunConfig(**{**cell, "epsilon": None, "no_dp": True, "method": method})
    model = copy.deepcopy(loaded.model)
    setup.inject(config, setup.make_method(config), model, init_seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    local = LocalTrainingConfig(expected_batch_size=cell["batch_size"], local_steps=1,
                                learning_rate=config.learning_rate, optimizer="adamw",
                                max_grad_norm=config.max_grad_norm, noise_multiplier=sigma)
    plain = torch.optim.AdamW(params, lr=config.learning_rate)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp = client._optimizer(params, local, torch.Generator().manual_seed(0))

    def step(runner, optimizer) -> float:
        started = time.perf_counter()
        example_losses(runner, batch, task=cell["task"]).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def plain_step() -> float:
        # Opacus' hooks sit on the submodules: off, the backward is the plain one.
        private.disable_hooks()
        try:
            return step(model, plain)
        finally:
            private.enable_hooks()

    times: dict[str, list[float]] = {"no_dp": [], "dp": []}
    step(private, dp)
    plain_step()  # warm-up of both paths
    for _ in range(repeats):
        times["dp"].append(step(private, dp))
        times["no_dp"].append(plain_step())
    private._close()
    no_dp, with_dp = statistics.median(times["no_dp"]), statistics.median(times["dp"])
    return {"s_per_step_no_dp": no_dp, "s_per_step_dp": with_dp,
            "dp_over_no_dp": with_dp / no_dp, "repeats": repeats,
            "trainable_parameters": sum(p.numel() for p in params)}


def _step_times(methods: list[str], cell: dict, sigma: float, repeats: int) -> dict:
    """Per method: median seconds per client step with and without DP on one fixed batch."""
    from fedsb_dp.console import quiet_expected_warnings
    from fedsb_dp.federated import setup
    from fedsb_dp.federated.run_config import RunConfig

    quiet_expected_warnings()
    base_config = RunConfig(**{**cell, "epsilon": None, "no_dp": True})
    data = setup.load_data(base_config)
    frames, _ = setup.partition_frames(base_config, data, partition_seed=0)
    loaded = setup.load_base_model(base_config, num_labels=data.num_labels)
    task = setup.make_task(base_config, data)
    client = setup.make_client("client-0", frames["client-0"], base_config, loaded.tokenizer,
                               task)
    batch = client.collate([client.dataset[i] for i in range(cell["batch_size"])])
    out = {}
    for method in dict.fromkeys(_split(m)[0] for m in methods):
        out[method] = _time_method(method, loaded, client, batch, cell, sigma, repeats)
        print(json.dumps({"timing": method, **out[method]}), flush=True)
    return out


def _comm(methods: list[str], cell: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedsb_dp.cli", "comm", "--model", GEMMA_CONFIG,
         "--rank", str(cell["rank"]), "--clients", str(cell["clients"])],
        capture_output=True, text=True, check=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fedsb,fedsb@0.003,fedsb:r64@0.003,ffa-lora,fedit",
                        help="comma-separated METHOD[:rRANK][@LR]")
    parser.add_argument("--rounds", type=int, default=CELL["rounds"])
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="timed steps per method and mode (after one warm-up each)")
    parser.add_argument("--model", default=CELL["model"],
                        help="another decoder (a smoke test on a tiny one)")
    parser.add_argument("--skip-runs", action="store_true", help="timing and comm only")
    parser.add_argument("--results", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "decoder_methods.json"))
    args = parser.parse_args()
    cell = {**CELL, "rounds": args.rounds, "model": args.model}
    methods = args.methods.split(",")
    rows = []
    if not args.skip_runs:
        with tempfile.TemporaryDirectory(prefix="decoder-methods-") as root:
            for spec in methods:
                rows.append(_run(spec, os.path.join(
                    root, spec.replace("@", "-lr").replace(":", "-")), cell))
                print(json.dumps(rows[-1]), flush=True)
    sigma = rows[0]["sigma"] if rows else 0.7
    timing = _step_times(methods, cell, sigma, args.timing_repeats)
    comm = _comm(methods, cell)
    header = ("method", "r", "lr", "loss", "ppl", "exact", "ε", "σ", "params", "B/client/round",
              "s/step no DP", "s/step DP", "DP ratio", "wall s", "RSS GB")
    print(" | ".join(header))
    for r in rows:
        t = timing[_split(r["method"])[0]]
        print(" | ".join(str(x) for x in (
            r["method"], r["rank"], r["learning_rate"], f"{r['test_loss']:.3f}",
            f"{r['test_perplexity']:.1f}", f"{r['exact_match']:.3f}", f"{r['epsilon']:.4f}",
            f"{r['sigma']:.3f}", f"{r['trainable_parameters']:,}",
            f"{r['bytes_up_per_client_round']:,.0f}", f"{t['s_per_step_no_dp']:.2f}",
            f"{t['s_per_step_dp']:.2f}", f"{t['dp_over_no_dp']:.2f}", r["wall_s"],
            f"{r['peak_rss_gb']:.2f}")))
    print(comm)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as fh:
        json.dump({"cell": cell, "rows": rows, "step_times": timing,
                   "comm_gemma_3_270m": comm}, fh, indent=2)


if __name__ == "__main__":
    main()
