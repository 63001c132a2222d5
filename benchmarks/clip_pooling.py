"""Ablation behind two defaults: the clip norm C and the classifier's pooling.

One client holding 3,000 Rotten Tomatoes records trains LoRA-SB (r = 16, query/value, head)
through the real DP client code (Opacus per-sample clipping, Poisson batches of 64, AdamW
2e-3) with σ = 0, so only clipping and pooling differ; validation accuracy after K steps.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/clip_pooling.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from opacus import GradSampleModule

from fedsb_dp.adapters import (
    SBConfig,
    find_target_modules,
    inject_adapters,
    trainable_state,
    w0_svd_init,
)
from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.federated.client import DPClient, LocalTrainingConfig
from fedsb_dp.models import SEQUENCE_CLASSIFICATION, load_model
from fedsb_dp.tasks.classification_metrics import evaluate_classifier


def run(pooling: str, clip: float, steps: int, records: int, seed: int) -> dict:
    data = load_text_classification(max_train_records=records)
    loaded = load_model(pooling=pooling)
    model = loaded.model
    config = SBConfig(rank=16)
    targets = find_target_modules(model, config.resolved_targets("bert"), rank=16)
    inject_adapters(model, w0_svd_init(targets, rank=16).factors, config)
    collate = make_collate(loaded.tokenizer)
    train = TokenizedDataset(data.train, loaded.tokenizer, max_length=32)
    validation = TokenizedDataset(data.validation.head(400), loaded.tokenizer, max_length=32)
    client = DPClient("pooled", train, collate, task=SEQUENCE_CLASSIFICATION)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    local = LocalTrainingConfig(expected_batch_size=64, local_steps=steps, learning_rate=2e-3,
                                optimizer="adamw", max_grad_norm=clip, noise_multiplier=0.0,
                                max_physical_batch_size=64)
    started = time.time()
    update = client.train_round(gsm, trainable_state(model), local,
                                noise_generator=torch.Generator().manual_seed(seed),
                                sampling_generator=torch.Generator().manual_seed(seed + 1))
    set_trainable_state(model, update.state)
    metrics = evaluate_classifier(model, validation, collate, num_labels=2)
    gsm._close()
    return {"pooling": pooling, "clip": clip, "steps": steps,
            "validation_accuracy": metrics["accuracy"], "validation_loss": metrics["loss"],
            "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default="mean:0.1,mean:1,mean:3,mean:10,mean:1e6,cls:3,cls:1e6",
                        help="pooling:clip pairs (1e6 = effectively no clipping)")
    parser.add_argument("--out", default="benchmarks/results/clip_pooling.json")
    args = parser.parse_args()
    quiet_expected_warnings()
    rows = []
    print(f"{'pooling':8s} {'C':>8s} {'val acc':>8s} {'val loss':>9s}")
    for item in args.grid.split(","):
        pooling, clip = item.split(":")
        row = run(pooling, float(clip), args.steps, args.records, args.seed)
        rows.append(row)
        print(f"{pooling:8s} {float(clip):8g} {row['validation_accuracy']:8.4f} "
              f"{row['validation_loss']:9.4f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"settings": vars(args), "rows": rows}, fh, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
