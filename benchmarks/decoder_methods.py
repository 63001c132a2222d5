"""Gemma-3-270M, private federated fine-tuning at equal ε: Fed-SB against its baselines.

Each method runs as its own ``fedsb-dp run --task causal-lm`` process on the same CPU-sized
cell (the offline Rotten Tomatoes reviews cast as "Review: …\\nSentiment:" → " fresh" /
" rotten"), so its peak RSS is its own. The table gives the held-out response loss and
perplexity, the exact-match accuracy of greedy generation, ε recomputed from the run's ledger,
bytes per client per round, wall time and peak RSS; the rows go to
``benchmarks/results/decoder_methods.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decoder_methods.py [--methods fedsb,ffa-lora]

Needs the opt-in Gemma install (``FEDSB_DP_GEMMA=1 bash scripts/install.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CELL = {"task": "causal-lm", "model": "gemma-270m", "epsilon": 3.0, "clients": 3, "rounds": 2,
        "local_steps": 2, "batch_size": 8, "max_length": 64, "max_train_records": 600,
        "max_eval_records": 32, "rank": 16, "seed": 0}


def _run(method: str, out: str) -> dict:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in CELL.items()]
    started = time.time()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "fedsb_dp.cli", "run",
         "--method", method, "--no-progress", *flags, "--out", out],
        capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    per_round = summary["bytes_up"] / (CELL["clients"] * max(summary["rounds_completed"], 1))
    return {"method": method, "status": summary["status"],
            "test_loss": summary.get("test_loss"),
            "test_perplexity": summary.get("test_perplexity"),
            "exact_match": summary.get("test_accuracy"),
            "epsilon": summary["privacy"]["epsilon"], "sigma": summary["noise_multiplier"],
            "trainable_parameters": summary["trainable_parameters"],
            "bytes_up_per_client_round": per_round,
            "wall_s": round(time.time() - started, 1),
            "peak_rss_gb": int(done.stderr.strip().splitlines()[-1]) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fedsb,ffa-lora,fedit")
    parser.add_argument("--results", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "decoder_methods.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="decoder-methods-") as root:
        for method in args.methods.split(","):
            rows.append(_run(method, os.path.join(root, method)))
            print(json.dumps(rows[-1]), flush=True)
    header = ("method", "loss", "ppl", "exact", "ε", "σ", "params", "B/client/round", "wall s",
              "RSS GB")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["method"], f"{r['test_loss']:.3f}", f"{r['test_perplexity']:.1f}",
            f"{r['exact_match']:.3f}", f"{r['epsilon']:.4f}", f"{r['sigma']:.3f}",
            f"{r['trainable_parameters']:,}", f"{r['bytes_up_per_client_round']:,.0f}",
            r["wall_s"], f"{r['peak_rss_gb']:.2f}")))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as fh:
        json.dump({"cell": CELL, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
