"""Ablations reviewers of Fed-SB asked for, at the privacy-utility benchmark's budget.

Each variant is a small sweep (``fedsb_dp.sweep``: one run directory per cell, resumable,
ε recomputed from every ledger) that changes one thing against the default Fed-SB run
(r = 16, W0-SVD init, 3 IID clients, ε = 3); two seeds each (a variant's directory grows in
place when seeds are added), so read them against the main grid's seed spread (Fed-SB r = 16
at ε = 3: three seeds in privacy_utility.toml):

- initialisation under DP: W0-SVD (default, reads no record), random orthonormal, DP
  gradient-SVD (each client Poisson-samples its init records at 64/N_i) at two budget shares
  (σ_init = 8: the default; σ_init = 4: a larger share), and
  the non-private gradient-SVD only as an ε = ∞ reference next to W0-SVD at ε = ∞;
- extreme ranks r = 1, 2, 4 and 8 (16, 32 and 64 are in the main grid);
- 30 clients (same total records, so each holds 340–341; batch 16);
- label skew Dirichlet(α = 0.1 and 1) (α = 0.3 is in the main grid).

The table gives test accuracy (mean ± std over the seeds run), the recomputed ε, the training σ
(a DP init takes its share of ε, so σ rises) and, for a DP init, the ε its release alone costs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablations.py --workers 2 \\
        --out benchmarks/results/ablations
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from accounting import PrivacyLedger, compute_epsilon
from accounting.events import ComposedDpEvent, event_from_dict
from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.sweep import SweepSpec, run_sweep
from fedsb_dp.sweep.results import collect_results

#: The privacy-utility benchmark's budget (benchmarks/privacy_utility.toml).
# batch 64: the default budget of the cell it varies (training_budget.py raised the default)
BASE: dict[str, Any] = {"max_eval_records": 400, "max_length": 32, "batch_size": 64}


@dataclass(frozen=True)
class Variant:
    """One ablation: a group, a label and the settings it changes."""

    group: str
    slug: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    epsilon: float | str = 3
    rank: int = 16
    partition: str = "iid"
    seeds: tuple[int, ...] = (0, 1)

    @property
    def name(self) -> str:
        """Directory name."""
        return f"{self.group}-{self.slug}"

    def spec(self) -> SweepSpec:
        """The variant as a one-method sweep."""
        return SweepSpec.from_dict({
            "epsilons": [self.epsilon], "methods": ["fedsb"], "partitions": [self.partition],
            "seeds": list(self.seeds), "ranks": {"fedsb": [self.rank]},
            "base": {**BASE, **self.settings}})


DP_INIT = {"init": "gradient-svd", "init_source": "dp"}
VARIANTS: tuple[Variant, ...] = (
    Variant("init", "w0svd", "W0-SVD (default)"),
    Variant("init", "random", "random orthonormal", {"init": "random-orthonormal"}),
    Variant("init", "dp-grad-s8", "DP gradient-SVD, σ_init=8",
            {**DP_INIT, "init_noise_multiplier": 8.0}),
    Variant("init", "dp-grad-s4", "DP gradient-SVD, σ_init=4",
            {**DP_INIT, "init_noise_multiplier": 4.0}),
    Variant("init", "w0svd-nodp", "W0-SVD, ε=∞", epsilon="inf"),
    Variant("init", "grad-nodp", "non-private gradient-SVD, ε=∞",
            {"init": "gradient-svd", "init_source": "nonprivate", "allow_nonprivate_init": True},
            epsilon="inf"),
    Variant("rank", "r1", "r=1", rank=1),
    Variant("rank", "r2", "r=2", rank=2),
    Variant("rank", "r4", "r=4", rank=4),
    Variant("rank", "r8", "r=8", rank=8),
    Variant("clients", "30", "30 clients, batch 16", {"clients": 30, "batch_size": 16}),
    Variant("skew", "dirichlet01", "Dirichlet(0.1)", partition="dirichlet:0.1"),
    Variant("skew", "dirichlet1", "Dirichlet(1.0)", partition="dirichlet:1.0"),
)


def init_epsilon(run_dir: str) -> float | None:
    """ε of the run's init release alone (the worst client's init events in its ledger), or None.

    Read from the ledger rather than rebuilt from the config, so a cell is judged by the
    charge it actually carries (an old cell's unsampled Gaussian, today's Poisson-sampled one).
    """
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)["config"]
    if config["no_dp"] or config["init"] != "gradient-svd" or config["init_source"] != "dp":
        return None
    ledger = PrivacyLedger.load(os.path.join(run_dir, "ledger.json"))
    worst = None
    for cid in ledger.clients:
        events = [event_from_dict(e["event"]) for e in ledger.to_json_dict()["body"]["entries"]
                  if e["client"] == cid and e["kind"] == "init"]
        if events:
            eps = compute_epsilon(ComposedDpEvent(tuple(events)), delta=ledger.target_delta,
                                  accountant="pld").epsilon
            worst = eps if worst is None else max(worst, eps)
    return worst


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def summarise(out: str) -> list[dict[str, Any]]:
    """One row per variant that has finished cells."""
    rows = []
    for variant in VARIANTS:
        path = os.path.join(out, variant.name)
        cells_dir = os.path.join(path, "cells")
        if not os.path.isdir(cells_dir) or not any(
                os.path.exists(os.path.join(cells_dir, c, "summary.json"))
                for c in os.listdir(cells_dir)):
            continue  # not run (yet): left out of the table rather than failing it
        frame = collect_results(path)
        cells = [os.path.join(path, "cells", run) for run in frame["run"]]
        init_eps = init_epsilon(cells[0])
        rows.append({
            "group": variant.group, "variant": variant.label, "seeds": len(frame),
            "test_accuracy": _fmt(frame["test_accuracy"].tolist()),
            "test_macro_f1": _fmt(frame["test_macro_f1"].tolist()),
            "epsilon": float(frame["epsilon"].max()),
            "sigma": float(frame["noise_multiplier"].mean()),
            "init_epsilon": init_eps,
            "trainable": int(frame["trainable_parameters"].iloc[0]),
            "bytes_total": int(frame["bytes_total"].mean()),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of docs/benchmarks.md."""
    lines = ["| group | variant | seeds | test accuracy | macro-F1 | ε (recomputed) | σ | "
             "ε of the init alone | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3f}"
        init = "—" if r["init_epsilon"] is None else f"{r['init_epsilon']:.3f}"
        lines.append(f"| {r['group']} | {r['variant']} | {r['seeds']} | {r['test_accuracy']} | "
                     f"{r['test_macro_f1']} | {eps} | {r['sigma']:.3f} | {init} | "
                     f"{r['trainable']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/ablations")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at once (each gets cpu_count // workers threads)")
    parser.add_argument("--only", help="comma-separated groups to run (init, rank, clients, "
                                       "skew); default all")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="run only variants i with i %% N == K (N processes side by side)")
    args = parser.parse_args()
    quiet_expected_warnings()
    groups = None if args.only is None else {g.strip() for g in args.only.split(",")}
    shard, shards = (int(v) for v in args.shard.split("/"))
    if not 0 <= shard < shards:
        parser.error(f"--shard {args.shard}: K must be in 0..N-1")
    for index, variant in enumerate(VARIANTS):
        if (groups is not None and variant.group not in groups) or index % shards != shard:
            continue
        print(f"{variant.group:8s} {variant.label}", flush=True)
        run_sweep(variant.spec(), os.path.join(args.out, variant.name), workers=args.workers)
    rows = summarise(args.out)
    with open(os.path.join(args.out, "ablations.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()
