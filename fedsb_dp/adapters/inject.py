"""Finding target layers, injecting :class:`SBLinear` wrappers, choosing what trains."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from fedsb_dp.adapters.config import SBConfig
from fedsb_dp.adapters.layer import SBLinear
from fedsb_dp.errors import AdapterMismatchError, ConfigError, ModelStructureError
from fedsb_dp.models import find_head, find_pooler


def _matches(name: str, target: str) -> bool:
    # Whole dotted components only: "value" matches "...attention.self.value", never "values".
    return name == target or name.endswith("." + target)


def find_target_modules(
    model: nn.Module, target_modules: tuple[str, ...], *, rank: int | None = None
) -> dict[str, nn.Linear]:
    """Return the linear layers named by ``target_modules``, in model order.

    Args:
        model: The model to search.
        target_modules: Dotted-name suffixes (e.g. ``"query"``, ``"attention.output.dense"``).
        rank: If given, also check ``rank ≤ min(m, n)`` for every match.

    Returns:
        Qualified name → linear layer.

    Raises:
        ModelStructureError: If a target matches nothing, matches a non-linear module, or the
            rank does not fit a matched layer. The message lists the linear layer names the
            model does have.

    """
    found: dict[str, nn.Linear] = {}
    for target in target_modules:
        hits = [(name, module) for name, module in model.named_modules() if _matches(name, target)]
        if not hits:
            leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, (nn.Linear, SBLinear))})
            raise ModelStructureError(
                f"target module {target!r} matches no layer of {type(model).__name__}; "
                f"its linear layers are named {leaves}"
            )
        for name, module in hits:
            if isinstance(module, SBLinear):
                raise ModelStructureError(f"layer {name!r} already carries a LoRA-SB adapter")
            if not isinstance(module, nn.Linear):
                raise ModelStructureError(
                    f"target {target!r} matches {name!r}, a {type(module).__name__}; LoRA-SB "
                    "adapts nn.Linear layers only"
                )
            found[name] = module
    if rank is not None:
        for name, module in found.items():
            check_rank_fits(name, module, rank)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def sb_layers(model: nn.Module) -> dict[str, SBLinear]:
    """All injected LoRA-SB layers of a model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SBLinear)}


def check_rank_fits(name: str, layer: nn.Linear, rank: int) -> None:
    """Raise :class:`ModelStructureError` unless 1 ≤ ``rank`` ≤ min(m, n) of ``layer``."""
    limit = min(layer.out_features, layer.in_features)
    if not 1 <= rank <= limit:
        raise ModelStructureError(
            f"rank={rank} does not fit layer {name!r} "
            f"({layer.out_features}×{layer.in_features}): valid range is 1..{limit}"
        )


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule called ``name`` (a qualified name) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapters(
    model: nn.Module,
    factors: Mapping[str, object],
    config: SBConfig,
) -> dict[str, SBLinear]:
    """Replace each target linear layer by an :class:`SBLinear` and set what trains.

    Args:
        model: The model, modified in place.
        factors: Qualified layer name → an object with tensors ``B``, ``R``, ``A``
            (see :class:`fedsb_dp.adapters.initializers.LayerFactors`).
        config: Adapter settings (dropout, scaling, whether the head trains).

    Returns:
        The injected layers.

    """
    for name, layer_factors in factors.items():
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ModelStructureError(f"{name!r} is a {type(base).__name__}, not nn.Linear")
        wrapped = SBLinear(
            base, B=layer_factors.B, R=layer_factors.R, A=layer_factors.A,
            dropout=config.dropout, scaling=config.scaling,
        )
        replace_submodule(model, name, wrapped)
    mark_trainable(model, train_head=config.train_head, train_pooler=config.train_pooler)
    return sb_layers(model)


def trainable_modules(model: nn.Module, *, train_head: bool,
                      train_pooler: bool = False) -> dict[str, nn.Module]:
    """The modules whose parameters train: every adapter's R, plus the head if asked."""
    modules: dict[str, nn.Module] = {f"{n}.R": layer.R for n, layer in sb_layers(model).items()}
    if train_head:
        head = find_head(model)
        if head is None:
            raise ModelStructureError(
                f"train_head=True but {type(model).__name__} has no classifier/score head"
            )
        modules[head[0]] = head[1]
    if train_pooler:
        pooler = find_pooler(model)
        if pooler is None:
            raise ModelStructureError(
                f"train_pooler=True but {type(model).__name__} has no pooler feeding its head")
        if not any(True for _ in pooler[1].parameters()):
            raise ModelStructureError(
                "train_pooler=True but the classifier reads a parameter-free mean pooler; "
                "there is nothing to train (use pooling='cls' to train the [CLS] pooler)")
        modules[pooler[0]] = pooler[1]
    return modules


def mark_trainable(model: nn.Module, *, train_head: bool, train_pooler: bool = False) -> list[str]:
    """Freeze everything, then unfreeze R (and the head) by module identity.

    Returns:
        Names of the trainable parameters.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in trainable_modules(model, train_head=train_head,
                                    train_pooler=train_pooler).values():
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable tensors (what a client communicates).

    On the CPU whatever the model's device: the server's state, aggregation, checkpoints and
    messages all live there (see :mod:`fedsb_dp.devices`).
    """
    return {name: p.detach().to("cpu", copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def train_only(model: nn.Module, names: Collection[str]) -> Iterator[None]:
    """Train only ``names`` (a subset of the trainable tensors) inside the block, then restore.

    A client trains exactly the tensors its instruction carries: for every method but RoLoRA
    that is its whole trainable set (a no-op); RoLoRA sends one factor per round and the
    other stays frozen. Only narrowing is allowed, so an instruction can never unfreeze a
    base weight; the previous flags come back on exit, whatever happens inside.

    Raises:
        ConfigError: If a name is not a trainable tensor of ``model``.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(names) - set(trainable))
    if unknown:
        raise ConfigError(f"the instruction carries {unknown[:3]}, which are not trainable "
                          f"tensors of this model")
    try:
        for name, parameter in trainable.items():
            parameter.requires_grad_(name in names)
        yield
    finally:
        for parameter in trainable.values():
            parameter.requires_grad_(True)


#: What :func:`frozen_fingerprint` hashes: the frozen tensors clients must share, or all.
FINGERPRINT_SCOPES = ("shared", "all")


def frozen_fingerprint(model: nn.Module, *, scope: str = "shared") -> str:
    """SHA-256 over frozen tensors of ``model``.

    ``scope="shared"``: every adapter's B and A and every frozen head tensor. Fed-SB is exact
    only if every client holds bit-identical B and A; the server compares this hash with each
    client's (it also travels in adapter files). For the LoRA baselines it covers the frozen
    factors (FFA-LoRA's A) and the adapted layers' base weights, which FedEx-LoRA and FLoRA
    change every round.

    ``scope="all"``: every frozen parameter and buffer of the model, base model included —
    what a client's local training must leave untouched.

    Raises:
        ConfigError: For a scope not in :data:`FINGERPRINT_SCOPES`.
    """
    if scope == "all":
        return _sha256([(n, p) for n, p in model.named_parameters() if not p.requires_grad]
                       + list(model.named_buffers()))
    if scope != "shared":
        raise ConfigError(f"scope={scope!r} is not one of {FINGERPRINT_SCOPES}")
    from fedsb_dp.adapters.lora import lora_layers

    tensors: list[tuple[str, torch.Tensor]] = []
    for name, layer in sb_layers(model).items():
        tensors += [(f"{name}.B", layer.lora_sb_B), (f"{name}.A", layer.lora_sb_A)]
    for name, layer in lora_layers(model).items():
        tensors.append((f"{name}.base", layer.base_layer.weight))
        tensors += [(f"{name}.{part}", getattr(layer, part).weight)
                    for part in ("lora_A", "lora_B")
                    if not getattr(layer, part).weight.requires_grad]
    head = find_head(model)
    if head is not None:
        tensors += [
            (f"{head[0]}.{n}", p) for n, p in head[1].named_parameters() if not p.requires_grad
        ]
    return _sha256(tensors)


def _sha256(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        # reshape(-1): a size-1 dim can leave a 'contiguous' tensor with stride(-1) ≠ 1
        # (rank-1 factors), which a dtype-changing view refuses
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_fingerprint(model: nn.Module, expected: str) -> None:
    """Raise :class:`AdapterMismatchError` unless the frozen factors hash to ``expected``."""
    actual = frozen_fingerprint(model)
    if actual != expected:
        raise AdapterMismatchError(
            f"frozen adapter factors hash {actual[:16]}… differs from the agreed {expected[:16]}…"
        )
