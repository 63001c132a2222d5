"""Communication calculator: parameters per round for every method, from a model config.

The model is built on PyTorch's ``meta`` device (shapes only, no weights, no memory), the
adapted layers are found by the same target rules as training, and each method's traffic is
counted per client per round:

========== ============================== ================================================
method     uplink (client → server)       downlink (server → client)
========== ============================== ================================================
fedsb      Σ r²  (+ head)                 Σ r²  (+ head)
fedit      Σ r(m+n)                       Σ r(m+n)
ffa-lora   Σ r·m  (B only)                Σ r·m
fedex-lora Σ r(m+n)                       Σ r(m+n) + residual: min((c+1)·r(m+n), m·n) per layer
flora      Σ r(m+n)                       c·Σ r(m+n)  (stacked factors)
fedsvd     Σ r·m  (B only)                Σ r(m+n)  (B̄ and the re-factorised A)
rolora     ½Σ r(m+n)  (B or A, in turn)   ½Σ r(m+n)  (the averaged factor)
head-only  head                           head  (no adapter; classifiers only)
========== ============================== ================================================

RoLoRA's rows are the mean of its two kinds of round (Σ r·m in B rounds, Σ r·n in A rounds).
FedSVD and RoLoRA postdate the Fed-SB paper; their ``paper_params`` are our own counts
(FedSVD: its downlink, the larger way; RoLoRA: its per-round mean).

The paper's convention (``paper_params``) counts FFA-LoRA as ½Σ r(m+n) and FedEx-LoRA/FLoRA as
c·Σ r(m+n); both are printed so the figures can be compared with the paper's (docs/benchmarks.md,
§4 Communication).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from fedsb_dp.errors import ConfigError

COMM_METHODS = ("fedsb", "fedit", "ffa-lora", "fedex-lora", "flora", "fedsvd", "rolora",
                "head-only")


@dataclass(frozen=True)
class AdaptedShapes:
    """Shapes of a model's adapted layers and head, read off a meta-device build.

    Attributes:
        model_type: The config's ``model_type``.
        layers: Qualified name → (m, n) = (out_features, in_features).
        head_params: Parameters of the classification head (0 for a causal LM).
    """

    model_type: str
    layers: dict[str, tuple[int, int]]
    head_params: int


def load_config(config_or_id: str) -> Any:
    """A ``transformers`` config from a JSON file, a model directory, an alias or a hub id."""
    from transformers import AutoConfig

    from fedsb_dp.models import resolve_model_path

    if os.path.isfile(config_or_id):
        with open(config_or_id, encoding="utf-8") as fh:
            data = json.load(fh)
        if "model_type" not in data:
            raise ConfigError(f"{config_or_id!r} has no 'model_type'; it is not a transformers "
                              "config.json")
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    return AutoConfig.from_pretrained(resolve_model_path(config_or_id))


def _declares_mean_pooling(config_or_id: str) -> bool:
    """Whether training would mean-pool this model (pooling="auto" on a local checkpoint)."""
    from fedsb_dp.models import checkpoint_pooling, resolve_model_path

    if os.path.isfile(config_or_id):
        return False
    path = resolve_model_path(config_or_id)
    return os.path.isdir(path) and checkpoint_pooling(path) == "mean"


def adapted_shapes(config: Any, *, targets: tuple[str, ...] | None = None,
                   num_labels: int | None = None, mean_pooled: bool = False) -> AdaptedShapes:
    """Build the model on the meta device and read the target layers' shapes.

    Args:
        config: A ``transformers`` config.
        targets: Target module suffixes (default: the architecture's, as in training).
        num_labels: Build a sequence classifier with this many labels (its head counts);
            ``None`` builds a causal LM (no head is trained or sent).
        mean_pooled: Count the head a mean-pooled classifier trains
            (``fedsb_dp.models.use_mean_pooling``: MPNet's dense first-token head becomes one
            Linear), as training does for sentence-transformers checkpoints.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedsb_dp.adapters.config import default_targets
    from fedsb_dp.adapters.inject import find_target_modules
    from fedsb_dp.models import find_head, use_mean_pooling

    with torch.device("meta"):
        if num_labels is None:
            model = AutoModelForCausalLM.from_config(config)
        else:
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
    if mean_pooled and num_labels is not None:
        with torch.device("meta"):
            use_mean_pooling(model)
    found = find_target_modules(model, targets or default_targets(config.model_type))
    head = find_head(model) if num_labels is not None else None
    head_params = sum(p.numel() for p in head[1].parameters()) if head else 0
    return AdaptedShapes(config.model_type,
                         {name: (m.out_features, m.in_features) for name, m in found.items()},
                         head_params)


def method_traffic(shapes: AdaptedShapes, method: str, *, rank: int, clients: int,
                   ) -> dict[str, Any]:
    """Parameters per client per round for one method (see the module table)."""
    if method not in COMM_METHODS:
        raise ConfigError(f"method={method!r} is not one of {COMM_METHODS}")
    if rank < 1 or clients < 1:
        raise ConfigError(f"rank={rank} and clients={clients} must be ≥ 1")
    for name, (m, n) in shapes.layers.items():
        if rank > min(m, n):
            raise ConfigError(f"rank={rank} does not fit layer {name!r} ({m}×{n}): valid range "
                              f"is 1..{min(m, n)}")
    lora = sum(rank * (m + n) for m, n in shapes.layers.values())
    head = shapes.head_params
    if method == "head-only":
        if not head:
            raise ConfigError("method='head-only' needs a classification head (--num-labels); "
                              "a causal LM has none to train")
        up = down = paper = head
        rank = 0  # no adapter
    elif method == "fedsb":
        up = down = paper = len(shapes.layers) * rank * rank + head
    elif method == "fedit":
        up = down = paper = lora + head
    elif method == "ffa-lora":
        up = down = sum(rank * m for m, _ in shapes.layers.values()) + head
        paper = lora // 2 + head
    elif method == "fedex-lora":
        up = lora + head
        down = up + sum(min((clients + 1) * rank * (m + n), m * n)
                        for m, n in shapes.layers.values())
        paper = clients * (lora + head)
    elif method == "fedsvd":
        up = sum(rank * m for m, _ in shapes.layers.values()) + head
        down = paper = lora + head
    elif method == "rolora":
        up = down = paper = lora // 2 + head
    else:  # flora
        up = lora + head
        down = clients * lora + head
        paper = clients * (lora + head)
    return {"method": method, "rank": rank, "clients": clients,
            "adapted_modules": len(shapes.layers), "uplink_params": up,
            "downlink_params": down, "paper_params": paper,
            "round_bytes_fp32": 4 * clients * (up + down)}


def communication_table(config_or_id: str, *, rank: int, clients: int,
                        fedsb_rank: int | None = None, targets: tuple[str, ...] | None = None,
                        num_labels: int | None = None, methods: tuple[str, ...] = COMM_METHODS):
    """One row per method (pandas DataFrame); Fed-SB may use its own rank (the paper: 200).

    Returns:
        DataFrame with the per-client uplink/downlink parameters per round, the paper's
        count, fp32 bytes per round over all clients, and ``vs_fedsb`` = paper count ÷ Fed-SB's.
    """
    import pandas as pd

    shapes = adapted_shapes(load_config(config_or_id), targets=targets, num_labels=num_labels,
                            mean_pooled=_declares_mean_pooling(config_or_id))
    # Head-only has nothing to send without a head (a causal LM): no row rather than zeros.
    methods = tuple(m for m in methods if m != "head-only" or shapes.head_params)
    rows = [method_traffic(shapes, m, rank=(fedsb_rank or rank) if m == "fedsb" else rank,
                           clients=clients) for m in methods]
    frame = pd.DataFrame(rows)
    if "fedsb" in methods:
        fedsb = frame.loc[frame["method"] == "fedsb", "paper_params"].iloc[0]
        frame["vs_fedsb"] = frame["paper_params"] / fedsb
    return frame


def _human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f}"


def _comm(args: argparse.Namespace) -> int:
    targets = tuple(t for t in args.targets.split(",") if t) if args.targets else None
    frame = communication_table(args.model, rank=args.rank, clients=args.clients,
                                fedsb_rank=args.fedsb_rank, targets=targets,
                                num_labels=args.num_labels)
    print(f"{args.model}: {frame['adapted_modules'].iloc[0]} adapted modules, "
          f"{args.clients} clients, parameters per client per round")
    print(f"{'method':12s} {'rank':>5s} {'uplink':>10s} {'downlink':>10s} {'paper':>10s} "
          f"{'vs fedsb':>9s}")
    for row in frame.itertuples():
        print(f"{row.method:12s} {row.rank:5d} {_human(row.uplink_params):>10s} "
              f"{_human(row.downlink_params):>10s} {_human(row.paper_params):>10s} "
              f"{row.vs_fedsb:8.1f}×")
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedsb-dp comm`` to a CLI."""
    parser = subparsers.add_parser(
        "comm", help="parameters communicated per round by every method (no weights loaded)",
        description="Count per-round communication of Fed-SB and the LoRA baselines from a "
                    "model config (meta device: no weights, no memory).")
    parser.add_argument("--model", required=True,
                        help="config.json file, model directory, 'minilm', or hub id")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank of the baselines")
    parser.add_argument("--fedsb-rank", type=int, help="Fed-SB's rank (default: --rank)")
    parser.add_argument("--clients", type=int, required=True, help="clients per round")
    parser.add_argument("--targets", help="comma-separated target modules (default per model)")
    parser.add_argument("--num-labels", type=int,
                        help="count a sequence-classification head with this many labels")
    parser.add_argument("--out", help="also write the table as CSV")
    parser.set_defaults(func=_comm)
