"""Shared σ vs per-client σᵢ: Fed-SB test accuracy at equal ε on label-skewed splits.

Each (Dirichlet α, seed) cell runs twice in the same process, once with ``--noise shared`` and
once with ``--noise per-client``; the seed fixes the split, the batches and the noise draws,
so the two runs of a pair differ only in σᵢ and the paired difference (per-client − shared)
isolates its effect. Prints the per-cell σᵢ, the accuracies, the paired differences with a
95 % t interval, and writes everything to ``benchmarks/results/per_client_noise.json``.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/per_client_noise.py \\
        --alphas 0.1,0.3 --seeds 0,1,2 --out /tmp/per-client-noise

Finished runs in ``--out`` are reused, so an interrupted measurement resumes.

``--sigma-only`` skips training: it draws the same seeded splits as the runs and calibrates
the shared σ and every σᵢ with the runs' accountant and δ (results to
``benchmarks/results/per_client_sigma.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig

RESULTS = "benchmarks/results/per_client_noise.json"
#: The privacy-utility grid's cell (docs/benchmarks.md) at ε = 3; --rounds, --local-steps and
#: --max-eval-records shrink it for a busy machine.
CELL = dict(method="fedsb", rank=16, clients=3, rounds=3, local_steps=10, batch_size=64,
            max_length=32, max_eval_records=400, epsilon=3.0)
MODES = ("shared", "per-client")


def _t975(df: int) -> float:
    """Two-sided 95 % Student t quantile."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences (NaN bounds below two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = _t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def run_cell(out: str, alpha: float, seed: int, mode: str, cell: dict[str, Any],
             ) -> dict[str, Any]:
    """One run (reused when its summary exists); returns what the table needs."""
    path = os.path.join(out, f"dir{alpha:g}-c{cell['clients']}-s{seed}-{mode}")
    summary_path = os.path.join(path, rd.SUMMARY)
    started = time.time()
    if not os.path.exists(summary_path):
        if os.path.exists(path):  # an interrupted run: start it again from scratch
            import shutil

            shutil.rmtree(path)
        config = RunConfig(**cell, partition=f"dirichlet:{alpha:g}",
                           seed=seed, noise=mode, out=path)
        run_federation(config, progress=False)
    summary = rd.read_json(summary_path)
    operator = {}
    for line in open(os.path.join(path, rd.OPERATOR), encoding="utf-8"):
        record = json.loads(line)
        if record.get("kind") == "summary":
            operator = record
    sizes = summary.get("clients") or operator.get("clients")
    sigmas = summary.get("noise_multipliers") or {c: summary["noise_multiplier"] for c in sizes}
    return {"alpha": alpha, "seed": seed, "mode": mode, "clients": sizes,
            "sigmas": sigmas, "test_accuracy": summary["test_accuracy"],
            "epsilon": summary["privacy"]["epsilon"],
            "per_client_epsilon": summary["privacy"]["per_client_epsilon"],
            "seconds": time.time() - started}


def sigma_table(alphas: list[float], seeds: list[int], cell: dict[str, Any],
                results: str) -> None:
    """Shared σ vs per-client σᵢ on the runs' own splits, no training."""
    from accounting import calibrate_noise_multiplier, calibrate_per_client, default_delta
    from fedsb_dp.federated.privacy_unit import privacy_unit
    from fedsb_dp.federated.setup import load_data, partition_frames
    from fedsb_dp.rng import RandomStreams

    rows = []
    print("| Dirichlet α | seed | Nᵢ | shared σ | per-client σᵢ | largest client σᵢ / shared σ "
          "| s |\n|---|---|---|---|---|---|---|", flush=True)
    data = None
    for alpha in alphas:
        for seed in seeds:
            started = time.time()
            config = RunConfig(**cell, partition=f"dirichlet:{alpha:g}", seed=seed,
                               noise="per-client")
            data = data or load_data(config)
            frames, _ = partition_frames(config, data, partition_seed=RandomStreams(
                seed).integer("partition"))
            sizes = {cid: len(frame) for cid, frame in frames.items()}
            plan = privacy_unit(config).plan(sizes, {})
            delta = default_delta(sum(sizes.values()))
            own = {cid: r.noise_multiplier for cid, r in calibrate_per_client(
                target_epsilon=config.epsilon, target_delta=delta, plan=plan,
                accountant=config.accountant).items()}
            shared = calibrate_noise_multiplier(
                target_epsilon=config.epsilon, target_delta=delta, plan=plan,
                accountant=config.accountant).noise_multiplier
            largest = max(sizes, key=sizes.get)
            rows.append({"alpha": alpha, "seed": seed, "sizes": sizes, "delta": delta,
                         "shared_sigma": shared, "per_client_sigma": own,
                         "largest_over_shared": own[largest] / shared})
            print(f"| {alpha:g} | {seed} | {', '.join(map(str, sizes.values()))} | "
                  f"{shared:.3f} | {', '.join(f'{v:.3f}' for v in own.values())} | "
                  f"{own[largest] / shared:.3f} | {time.time() - started:.0f} |", flush=True)
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    with open(results, "w", encoding="utf-8") as fh:
        json.dump({"cell": cell, "rows": rows}, fh, indent=1)
    print(f"wrote {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", default="0.1,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    for name in ("clients", "rounds", "local_steps", "max_eval_records"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=CELL[name])
    parser.add_argument("--out", default="runs/per-client-noise")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--sigma-only", action="store_true",
                        help="calibrate σ on the runs' splits without training")
    args = parser.parse_args()
    quiet_expected_warnings()
    cell = {**CELL, **{name: getattr(args, name)
                       for name in ("clients", "rounds", "local_steps", "max_eval_records")}}
    alphas = [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.sigma_only:
        sigma_table(alphas, seeds, cell, "benchmarks/results/per_client_sigma.json")
        return
    rows: list[dict[str, Any]] = []
    for seed in seeds:  # seed-major: an interrupted run still leaves whole pairs
        for alpha in alphas:
            for mode in MODES:
                row = run_cell(args.out, alpha, seed, mode, cell)
                rows.append(row)
                sig = ", ".join(f"{s:.3f}" for s in row["sigmas"].values())
                print(f"α={alpha:g} seed={seed} {mode:10s} N={list(row['clients'].values())} "
                      f"σ=[{sig}] acc={row['test_accuracy']:.4f} ε={row['epsilon']:.4f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    pairs: dict[str, list[float]] = {}
    print("\n| Dirichlet α | seed | Nᵢ | shared σ | per-client σᵢ | shared acc | per-client acc "
          "| Δ (pp) |\n|---|---|---|---|---|---|---|---|")
    for alpha in alphas:
        for seed in seeds:
            cell = {r["mode"]: r for r in rows if r["alpha"] == alpha and r["seed"] == seed}
            shared, own = cell["shared"], cell["per-client"]
            diff = 100 * (own["test_accuracy"] - shared["test_accuracy"])
            pairs.setdefault(f"{alpha:g}", []).append(diff)
            pairs.setdefault("all", []).append(diff)
            print(f"| {alpha:g} | {seed} | {', '.join(map(str, shared['clients'].values()))} | "
                  f"{max(shared['sigmas'].values()):.3f} | "
                  f"{', '.join(f'{s:.3f}' for s in own['sigmas'].values())} | "
                  f"{shared['test_accuracy']:.4f} | {own['test_accuracy']:.4f} | {diff:+.2f} |")
    print("\n| α | pairs | mean Δ (pp) | 95 % CI |\n|---|---|---|---|")
    summary = {}
    for key, values in pairs.items():
        mean, low, high = interval(values)
        summary[key] = {"pairs": len(values), "mean_pp": mean, "ci95_pp": [low, high],
                        "differences_pp": values}
        print(f"| {key} | {len(values)} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] |")
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as fh:
        json.dump({"cell": cell, "alphas": alphas, "seeds": seeds,
                   "runs": rows, "paired_difference": summary}, fh, indent=1)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
