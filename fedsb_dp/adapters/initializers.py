"""Initialisers of the frozen factors B, A (and R⁰), each with the privacy event it incurs.

LoRA-SB's own initialiser (``gradient-svd``) looks at training data, so it is a release: it comes
in three explicitly named data sources (REFERENCE.md §2):

* ``public``: gradients on data the user declares public; no private record is touched
  (``NoOpDpEvent``).
* ``dp``: each example's gradient of all target weights is clipped jointly to ``C_init``, the
  clipped gradients are summed, and ``N(0, σ_init² C_init²)`` is added to every coordinate
  before sign and SVD (post-processing). One Gaussian mechanism of sensitivity ``C_init`` under
  add/remove of one record: ``GaussianDpEvent(σ_init)`` charged to every client whose records
  were used. In a federation each client releases its own noisy sum once
  (:func:`dp_gradient_sum`) and the server adds them (:func:`factors_from_gradients`).
* ``nonprivate``: the authors' raw-gradient initialisation, only behind
  ``allow_nonprivate=True``; its event is ``NonPrivateDpEvent`` and the run's ε is ∞.

The data-free initialisers (``w0-svd``, ``random-orthonormal``) release nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from accounting.events import GaussianDpEvent, NonPrivateDpEvent, NoOpDpEvent
from fedsb_dp.errors import ConfigError
from fedsb_dp.losses import example_losses

logger = logging.getLogger(__name__)

INIT_METHODS = ("gradient-svd", "w0-svd", "random-orthonormal")
GRADIENT_SOURCES = ("public", "dp", "nonprivate")


@dataclass(frozen=True)
class LayerFactors:
    """Factors of one adapted layer: B (m×r), R⁰ (r×r), A (r×n)."""

    B: torch.Tensor
    R: torch.Tensor
    A: torch.Tensor


@dataclass(frozen=True)
class InitResult:
    """What an initialiser produced and what it cost.

    Attributes:
        method: One of :data:`INIT_METHODS`.
        factors: Qualified layer name → factors.
        event: The privacy event charged to each client whose records were used (an
            ``accounting`` event; ``NoOpDpEvent`` when no private record was read).
        source: For ``gradient-svd``, one of :data:`GRADIENT_SOURCES`.
        examples_used: Number of records read per client id (empty for data-free methods).
        details: JSON-safe description (parameters, seeds) for the run's provenance.

    """

    method: str
    factors: dict[str, LayerFactors]
    event: Any
    source: str | None = None
    examples_used: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def os_entropy_generator() -> torch.Generator:
    """A generator seeded from OS entropy, for noise that is an actual privacy release."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows×cols matrix with orthonormal columns (rows ≥ cols), from a Gaussian's QR."""
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Sign-fix so the draw is a deterministic function of the generator state.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


def random_orthonormal_init(
    targets: Mapping[str, nn.Linear], *, rank: int, seed: int
) -> InitResult:
    """Data-free: independent random orthonormal B and A per layer, R⁰ = 0.

    One generator is created from ``seed`` and drawn from layer after layer, so every layer
    gets different matrices (a per-layer reseed would give them all the same one).
    """
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, layer in targets.items():
        m, n = layer.out_features, layer.in_features
        B = _orthonormal(m, rank, generator)
        A = _orthonormal(n, rank, generator).T.contiguous()
        factors[name] = LayerFactors(B=B, R=torch.zeros(rank, rank), A=A)
    return InitResult(
        method="random-orthonormal", factors=factors, event=NoOpDpEvent(),
        details={"seed": seed, "rank": rank},
    )


def w0_svd_init(targets: Mapping[str, nn.Linear], *, rank: int) -> InitResult:
    """Data-free (LoRA-XS style): B, A from the top-r singular vectors of W0, R⁰ = 0."""
    factors = {}
    for name, layer in targets.items():
        u, _, vh = torch.linalg.svd(layer.weight.detach().to(torch.float64), full_matrices=False)
        factors[name] = LayerFactors(
            B=u[:, :rank].float().contiguous(), R=torch.zeros(rank, rank),
            A=vh[:rank].float().contiguous(),
        )
    return InitResult(method="w0-svd", factors=factors, event=NoOpDpEvent(),
                      details={"rank": rank})


def factors_from_gradients(
    gradients: Mapping[str, torch.Tensor],
    *,
    rank: int,
    lr_eff: float,
    zero_r: bool = False,
) -> dict[str, LayerFactors]:
    """LoRA-SB update approximation: Ĝ = −lr_eff·sign(G); rank-r SVD → B = U_r, R⁰ = Σ_r, A = V_rᵀ.

    Args:
        gradients: Layer name → summed (possibly noised) gradient of its weight (m×n).
        rank: r.
        lr_eff: Step size of the approximate first Adam step; only scales R⁰.
        zero_r: Start from R⁰ = 0 instead of Σ_r.

    Returns:
        Layer name → factors in float32. The SVD runs in float64 (no low-precision round trip),
        so B and A are orthonormal to float32 rounding.

    """
    if not lr_eff > 0:
        raise ConfigError(f"lr_eff={lr_eff} must be > 0")
    factors = {}
    for name, gradient in gradients.items():
        approx = -lr_eff * torch.sign(gradient.detach().to(torch.float64))
        u, s, vh = torch.linalg.svd(approx, full_matrices=False)
        r0 = torch.zeros(rank, rank) if zero_r else torch.diag(s[:rank]).float()
        factors[name] = LayerFactors(
            B=u[:, :rank].float().contiguous(), R=r0, A=vh[:rank].float().contiguous()
        )
    return factors


class _TargetGradients:
    """Makes only the target weights require grad for the duration of a ``with`` block."""

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Linear]) -> None:
        self.model = model
        self.targets = targets
        self.saved: dict[nn.Parameter, bool] = {}
        self.was_training = model.training

    def __enter__(self) -> _TargetGradients:
        self.saved = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in self.targets.values():
            layer.weight.requires_grad_(True)
        # Opacus captures activations only in train mode.
        self.model.train()
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.saved.items():
            p.requires_grad_(flag)
            p.grad = None
        self.model.train(self.was_training)


def _check_n_init(n_init: int, available: int) -> None:
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ConfigError(f"n_init={n_init!r} must be a positive integer")
    if n_init > available:
        raise ConfigError(f"n_init={n_init} exceeds the {available} records available")


def _batches(
    dataset: torch.utils.data.Dataset, collate: Callable, *, n_init: int, batch_size: int
) -> Iterable[dict[str, torch.Tensor]]:
    subset = torch.utils.data.Subset(dataset, range(n_init))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate)


def raw_gradient_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    n_init: int,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Σ over the first ``n_init`` records of ∇_W loss, unclipped (public or non-private data)."""
    _check_n_init(n_init, len(dataset))
    sums = {name: torch.zeros_like(layer.weight) for name, layer in targets.items()}
    with _TargetGradients(model, targets):
        for batch in _batches(dataset, collate, n_init=n_init, batch_size=batch_size):
            example_losses(model, batch, task=task).sum().backward()
            for name, layer in targets.items():
                sums[name] += layer.weight.grad
                layer.weight.grad = None
    return sums


def clipped_gradient_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    n_init: int,
    max_grad_norm: float,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Σ over the first ``n_init`` records of each example's gradient clipped jointly to C.

    Per-example gradients come from Opacus' per-sample-gradient hooks on the target layers;
    one example's contribution to the returned sum has norm ≤ ``max_grad_norm`` over all
    targets together, which is the sensitivity the Gaussian noise is calibrated to.
    """
    from opacus import GradSampleModule

    _check_n_init(n_init, len(dataset))
    if not max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm={max_grad_norm} must be > 0")
    sums = {name: torch.zeros_like(layer.weight) for name, layer in targets.items()}
    with _TargetGradients(model, targets):
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            for batch in _batches(dataset, collate, n_init=n_init, batch_size=batch_size):
                example_losses(wrapped, batch, task=task).sum().backward()
                per_example = {n: layer.weight.grad_sample for n, layer in targets.items()}
                squared = sum(g.flatten(1).pow(2).sum(dim=1) for g in per_example.values())
                factor = (max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
                for name, g in per_example.items():
                    sums[name] += torch.einsum("b,b...->...", factor, g)
                wrapped.zero_grad(set_to_none=True)
        finally:
            wrapped._close()
    return sums


def dp_gradient_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    n_init: int,
    max_grad_norm: float,
    noise_multiplier: float,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    allow_nonprivate: bool = False,
) -> tuple[dict[str, torch.Tensor], Any]:
    """One client's noisy clipped gradient sum and the event it releases.

    Args:
        model: Model whose target weights get the gradients.
        targets: Target linear layers by qualified name.
        dataset: The client's records (the first ``n_init`` are used).
        collate: Batch collate function.
        task: Loss type.
        n_init: Records used (≥ 1).
        max_grad_norm: C_init, joint per-example clip norm over all targets.
        noise_multiplier: σ_init; noise std per coordinate is σ_init·C_init.
        batch_size: Physical batch size (memory only; the release is one sum).
        generator: Noise source; ``None`` draws from OS entropy. A seeded generator makes the
            run reproducible and must be marked as such in the ledger.
        allow_nonprivate: Permit σ_init = 0 (then the event is ``NonPrivateDpEvent``).

    Returns:
        The noisy sums and the event (``GaussianDpEvent(σ_init)``).

    """
    if noise_multiplier < 0 or (noise_multiplier == 0 and not allow_nonprivate):
        raise ConfigError(
            f"noise_multiplier={noise_multiplier} for the DP initialisation must be > 0 "
            "(σ_init = 0 is non-private and needs allow_nonprivate=True)"
        )
    sums = clipped_gradient_sum(
        model, targets, dataset, collate, task=task, n_init=n_init,
        max_grad_norm=max_grad_norm, batch_size=batch_size,
    )
    if noise_multiplier == 0:
        return sums, NonPrivateDpEvent()
    generator = generator or os_entropy_generator()
    std = noise_multiplier * max_grad_norm
    noisy = {
        name: s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype)
        for name, s in sums.items()
    }
    return noisy, GaussianDpEvent(noise_multiplier=noise_multiplier)


def gradient_svd_init(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    client_datasets: Mapping[str, torch.utils.data.Dataset],
    collate: Callable,
    *,
    task: str,
    rank: int,
    source: str,
    n_init: int,
    lr_eff: float = 5e-4,
    zero_r: bool = False,
    max_grad_norm: float | None = None,
    noise_multiplier: float | None = None,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    allow_nonprivate: bool = False,
) -> InitResult:
    """LoRA-SB's gradient-SVD initialisation over one or more data holders.

    Each entry of ``client_datasets`` contributes the gradient sum over its first ``n_init``
    records (noised per client in ``dp`` mode); the server adds the contributions and runs
    sign + SVD once, so every client receives identical factors.

    Args:
        model: The model before adapter injection.
        targets: Target linear layers.
        client_datasets: Data holder id → dataset. For ``source="public"`` the key names the
            public dataset and no client is charged.
        collate: Batch collate function.
        task: Loss type.
        rank: r.
        source: ``"public"``, ``"dp"`` or ``"nonprivate"``.
        n_init: Records per data holder.
        lr_eff: Scale of R⁰.
        zero_r: R⁰ = 0.
        max_grad_norm: C_init (``dp`` only).
        noise_multiplier: σ_init (``dp`` only).
        batch_size: Physical batch size.
        generator: Noise source for ``dp`` (default: OS entropy).
        allow_nonprivate: Required for ``source="nonprivate"`` (and σ_init = 0).

    Returns:
        The factors, the per-client event, and how many records each client contributed.

    """
    if source not in GRADIENT_SOURCES:
        raise ConfigError(f"init source={source!r} is not one of {GRADIENT_SOURCES}")
    if not client_datasets:
        raise ConfigError("gradient-svd initialisation needs at least one dataset")
    total: dict[str, torch.Tensor] = {n: torch.zeros_like(t.weight) for n, t in targets.items()}
    event: Any = NoOpDpEvent()
    if source == "dp":
        if max_grad_norm is None or noise_multiplier is None:
            raise ConfigError("source='dp' needs max_grad_norm (C_init) and noise_multiplier")
        for dataset in client_datasets.values():
            sums, event = dp_gradient_sum(
                model, targets, dataset, collate, task=task, n_init=n_init,
                max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                batch_size=batch_size, generator=generator, allow_nonprivate=allow_nonprivate,
            )
            for name in total:
                total[name] += sums[name]
    else:
        if source == "nonprivate" and not allow_nonprivate:
            raise ConfigError(
                "source='nonprivate' reads raw private gradients (ε = ∞); pass "
                "allow_nonprivate=True to do it anyway, or use 'dp', 'public', "
                "'w0-svd' or 'random-orthonormal'"
            )
        for dataset in client_datasets.values():
            sums = raw_gradient_sum(
                model, targets, dataset, collate, task=task, n_init=n_init,
                batch_size=batch_size,
            )
            for name in total:
                total[name] += sums[name]
        event = NonPrivateDpEvent() if source == "nonprivate" else NoOpDpEvent()
    factors = factors_from_gradients(total, rank=rank, lr_eff=lr_eff, zero_r=zero_r)
    charged = {} if source == "public" else {cid: n_init for cid in client_datasets}
    return InitResult(
        method="gradient-svd", factors=factors, event=event, source=source,
        examples_used=charged,
        details={
            "rank": rank, "n_init": n_init, "lr_eff": lr_eff, "zero_r": zero_r,
            "max_grad_norm": max_grad_norm, "noise_multiplier": noise_multiplier,
            "public_datasets": list(client_datasets) if source == "public" else [],
            "noise_seeded": generator is not None,
        },
    )
