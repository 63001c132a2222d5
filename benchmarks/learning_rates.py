"""Learning-rate selection under DP: how ``FederatedMethod.default_learning_rate`` was chosen.

Each method runs the privacy-utility benchmark's cell (all 10,225 Rotten Tomatoes training
records over 3 IID clients, sequences of 32 tokens, 3 rounds × 10 DP steps of expected batch
64, r = 16, C = 3, ε = 3, seed 0) at a few AdamW step sizes. The choice is made on the last
round's **validation loss** (400 records); validation accuracy on 400 records moves in steps of
0.25 points and is reported beside it, test accuracy only for the record. Finished runs are
skipped, so the script resumes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learning_rates.py \\
        --out benchmarks/results/learning_rates
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.methods import method_class

GRID: dict[str, tuple[float, ...]] = {
    "fedsb": (2e-3, 1e-2, 3e-2, 1e-1),
    "ffa-lora": (5e-3, 1e-2, 3e-2),
    "fedit": (5e-3, 1e-2, 3e-2),
}
# batch 64: the default budget when the step sizes were chosen (training_budget.py raised it)
CELL: dict[str, Any] = {"epsilon": 3.0, "seed": 0, "max_length": 32, "max_eval_records": 400,
                        "batch_size": 64}


def run_name(method: str, lr: float) -> str:
    """Directory of one (method, learning rate) run."""
    return f"{method}_lr{lr:g}"


def row(path: str, method: str, lr: float) -> dict[str, Any]:
    """The run's last validation point, test accuracy and ε (from its summary)."""
    with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as fh:
        rounds = [json.loads(line) for line in fh]
    with open(os.path.join(path, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    last = rounds[-1] if rounds else {"validation_loss": math.inf,
                                      "validation_accuracy": math.nan}
    return {"method": method, "learning_rate": lr, "rounds": len(rounds),
            "val_loss_by_round": [round(r["validation_loss"], 4) for r in rounds],
            "val_loss": last["validation_loss"], "val_accuracy": last["validation_accuracy"],
            "test_accuracy": summary["test_accuracy"], "status": summary["status"],
            "noise_multiplier": summary["noise_multiplier"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/learning_rates")
    args = parser.parse_args()
    quiet_expected_warnings()
    rows = []
    for method, rates in GRID.items():
        for lr in rates:
            path = os.path.join(args.out, run_name(method, lr))
            if not os.path.exists(os.path.join(path, "summary.json")):
                config = RunConfig(**CELL, method=method, learning_rate=lr, out=path)
                # a diverging step size ends as status "stopped-nonfinite", still a result
                run_federation(config, progress=False)
            if os.path.exists(os.path.join(path, "summary.json")):
                rows.append(row(path, method, lr))
            else:
                rows.append({"method": method, "learning_rate": lr, "status": "diverged",
                             "val_loss": math.inf})
    print("| method | lr | val loss (last round) | val acc | test acc | chosen |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        best = min((x for x in rows if x["method"] == r["method"]),
                   key=lambda x: x["val_loss"])
        chosen = "**yes**" if r is best else ""
        if r["status"] != "completed":
            print(f"| {r['method']} | {r['learning_rate']:g} | {r['status']} | | | |")
            continue
        print(f"| {r['method']} | {r['learning_rate']:g} | {r['val_loss']:.4f} | "
              f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {chosen} |")
        default = method_class(r["method"])[0].default_learning_rate
        if chosen and default != r["learning_rate"]:
            print(f"  note: {r['method']}'s default_learning_rate is {default:g}, "
                  f"not {r['learning_rate']:g}")
    with open(os.path.join(args.out, "learning_rates.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
