"""How much noise each method carries at the same (ε, δ, q, steps), on the default model.

For every method at one σ (calibrated once for the plan: it depends only on ε, δ, q and the
step count, never on the method):

* d, the trainable parameter count (adapters + head), and the expected noise norm of one
  step's noised sum, σ·C·√d;
* the measured noise-to-signal ratio of one client step: ‖noise‖ / ‖clipped sum‖, from
  Opacus' own ``clip_and_accumulate`` / ``add_noise`` on a real batch;
* the measured error of the aggregated update across clients: every client trains K local
  steps twice from the same start, on the same Poisson batches (same sampling seed), once
  with σ and once with σ = 0; each world is aggregated by the method, and
  ‖ΔW_noisy − ΔW_clean‖_F is summed over the adapted layers (ΔW = effective weight change).
  This shows FedIT's noise products and Fed-SB's averaging-down.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/noise_scale.py --epsilon 3 --rank 16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from accounting import FederatedPlan, calibrate_noise_multiplier
from fedsb_dp.adapters import find_target_modules, trainable_state, w0_svd_init
from fedsb_dp.adapters.config import default_targets
from fedsb_dp.console import quiet_expected_warnings
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.federated.client import DPClient, LocalTrainingConfig, poisson_indices
from fedsb_dp.losses import example_losses
from fedsb_dp.methods import effective_weights, method_class
from fedsb_dp.models import SEQUENCE_CLASSIFICATION, load_model

METHODS = ("fedsb", "ffa-lora", "fedit", "fedex-lora", "flora", "fedsvd", "rolora")


def _build(method_name: str, rank: int, scaling: float):
    loaded = load_model()
    model = loaded.model
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # both worlds must differ by the DP noise only
    cls, _ = method_class(method_name)
    method = cls(rank=rank, scaling=1.0 if cls.adapter == "lora-sb" else scaling)
    targets = find_target_modules(model, default_targets("bert"), rank=rank)
    factors = w0_svd_init(targets, rank=rank).factors if cls.adapter == "lora-sb" else None
    method.inject(model, targets, generator=torch.Generator().manual_seed(0), factors=factors)
    method.begin_round(model, 0)  # RoLoRA's first round (B); a no-op for the others
    return loaded, model.train(), method


def _step_nsr(model, dataset, collate, *, sigma, clip, batch_size, seed) -> float:
    """‖noise‖ / ‖clipped sum‖ of one step, read between Opacus' clip and noise stages."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=batch_size,
                            loss_reduction="mean",
                            generator=torch.Generator().manual_seed(seed))
    indices = poisson_indices(len(dataset), batch_size / len(dataset),
                               torch.Generator().manual_seed(seed))
    batch = collate([dataset[int(i)] for i in indices])
    example_losses(gsm, batch, task=SEQUENCE_CLASSIFICATION).mean().backward()
    optimizer.clip_and_accumulate()
    clipped = torch.cat([p.summed_grad.flatten() for p in params]).clone()
    optimizer.add_noise()
    noisy = torch.cat([p.grad.flatten() for p in params])
    gsm._close()
    return float((noisy - clipped).norm() / clipped.norm())


def _aggregate_error(model, method, clients, *, sigma, local: dict, seed: int) -> float:
    """‖ΔW_noisy − ΔW_clean‖_F of the aggregate, summed over layers (same batches)."""
    start = trainable_state(model)
    before = effective_weights(model)
    worlds = {}
    for name, noise in (("noisy", sigma), ("clean", 0.0)):
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        config = LocalTrainingConfig(noise_multiplier=noise, **local)
        states = []
        for i, client in enumerate(clients):
            update = client.train_round(
                gsm, start, config, noise_generator=torch.Generator().manual_seed(seed + i),
                sampling_generator=torch.Generator().manual_seed(1000 + seed + i))
            states.append(update.state)
        gsm._close()
        server = copy.deepcopy(model)
        result = method.aggregate(server, start, states,
                                  generator=torch.Generator().manual_seed(7))
        method.apply(server, result)
        after = effective_weights(server)
        worlds[name] = {k: after[k] - before[k] for k in after}
    return float(math.sqrt(sum(float((worlds["noisy"][k] - worlds["clean"][k]).norm() ** 2)
                               for k in worlds["noisy"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-scaling", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--records-per-client", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the calibrated plan")
    parser.add_argument("--clip", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/results/noise_scale.json")
    args = parser.parse_args()
    quiet_expected_warnings()

    q = args.batch_size / args.records_per_client
    plan = FederatedPlan(sampling_probabilities={f"c{i}": q for i in range(args.clients)},
                         local_steps=args.local_steps, rounds=args.rounds)
    sigma = calibrate_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta,
                                       plan=plan, accountant="pld").noise_multiplier
    data = load_text_classification(max_train_records=args.clients * args.records_per_client)
    local = dict(expected_batch_size=args.batch_size, local_steps=args.local_steps,
                 learning_rate=args.lr, optimizer="adamw", max_grad_norm=args.clip,
                 max_physical_batch_size=args.batch_size)
    rows = []
    print(f"σ = {sigma:.4f} for ε = {args.epsilon}, δ = {args.delta:g}, q = {q:.4f}, "
          f"{args.rounds} rounds × {args.local_steps} steps (PLD); C = {args.clip}, "
          f"{args.clients} clients")
    print(f"{'method':12s} {'d':>10s} {'σC√d':>9s} {'NSR(step)':>10s} {'‖ΔW err‖':>10s} "
          f"{'time':>6s}")
    for name in args.methods.split(","):
        started = time.time()
        loaded, model, method = _build(name, args.rank, args.lora_scaling)
        collate = make_collate(loaded.tokenizer)
        clients = []
        for i in range(args.clients):
            frame = data.train.iloc[i * args.records_per_client:(i + 1) *
                                    args.records_per_client].reset_index(drop=True)
            clients.append(DPClient(f"c{i}", TokenizedDataset(
                frame, loaded.tokenizer, max_length=args.max_length), collate,
                task=SEQUENCE_CLASSIFICATION))
        d = sum(p.numel() for p in model.parameters() if p.requires_grad)
        nsr = _step_nsr(model, clients[0].dataset, collate, sigma=sigma, clip=args.clip,
                        batch_size=args.batch_size, seed=1)
        error = _aggregate_error(model, method, clients, sigma=sigma, local=local, seed=11)
        row = {"method": name, "rank": args.rank, "trainable_parameters": d,
               "noise_multiplier": sigma, "expected_noise_norm": sigma * args.clip * math.sqrt(d),
               "step_noise_to_signal": nsr, "aggregate_delta_w_error": error,
               "seconds": time.time() - started}
        rows.append(row)
        print(f"{name:12s} {d:10,d} {row['expected_noise_norm']:9.3f} {nsr:10.2f} "
              f"{error:10.4f} {row['seconds']:5.0f}s", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"settings": vars(args), "machine": platform.platform(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}, fh,
                  indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
