"""Initialisers of the frozen factors B, A (and R⁰), each with the privacy event it incurs.

LoRA-SB's own initialiser (``gradient-svd``) looks at training data, so it is a release: it comes
in three explicitly named data sources (docs/privacy.md, "Initialisation"):

* ``public``: gradients on a dataset the user declares public (never the clients' own
  records); no private record is touched (``NoOpDpEvent``).
* ``dp``: each client includes each of its records independently with probability
  ``q_init = n_init / N_i`` (``n_init`` a public setting, so the rate depends on nothing but the
  client's own size), clips each included example's gradient of all target weights jointly to
  ``C_init``, sums, adds ``N(0, σ_init² C_init²)`` to every coordinate and divides by the
  *expected* count ``n_init``; sign and SVD are post-processing. Adding or removing one record
  moves the pre-noise sum by at most ``C_init`` (the record is in the sample or not; no other
  record moves), so the release is a Poisson-subsampled Gaussian:
  ``PoissonSampledDpEvent(q_init, GaussianDpEvent(σ_init))`` per client. (Taking the *first*
  ``n_init`` records instead would let one removal shift record ``n_init + 1`` in:
  sensitivity ``2·C_init``.) In a federation each client releases its own noisy sum once
  (:func:`dp_gradient_sum`) and the server adds them (:func:`factors_from_gradients`).
* ``nonprivate``: the authors' raw-gradient initialisation, only behind
  ``allow_nonprivate=True``; its event is ``NonPrivateDpEvent`` and the run's ε is ∞.

The data-free initialisers (``w0-svd``, ``random-orthonormal``) release nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from accounting.events import (
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    sampled_gaussian_event,
)
from fedsb_dp.clipping import clip_factors, joint_norms
from fedsb_dp.devices import device_of, to_device, trainable_dtype
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
        event: The privacy event charged to a client whose records were used (an
            ``accounting`` event; ``NoOpDpEvent`` when no private record was read). In
            ``dp`` mode the rate differs per client: see ``events``.
        source: For ``gradient-svd``, one of :data:`GRADIENT_SOURCES`.
        examples_used: Records charged per client id (empty for data-free and public inits).
        events: Client id → its own event (``dp``: each client's own q_init).
        details: JSON-safe description (parameters, seeds) for the run's provenance.

    """

    method: str
    factors: dict[str, LayerFactors]
    event: Any
    source: str | None = None
    examples_used: dict[str, int] = field(default_factory=dict)
    events: dict[str, Any] = field(default_factory=dict)
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


def _check_n_init(n_init: int) -> None:
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ConfigError(f"n_init={n_init!r} must be a positive integer")


def init_sampling_probability(expected_examples: int, num_records: int, *,
                              client_id: str = "the client") -> float:
    """q_init = n_init / N_i, the rate at which a client samples its own init records.

    The rate depends only on the public setting ``n_init`` and the client's own size, so no
    client's init depends on another client's data.

    Raises:
        ConfigError: If ``n_init`` is not a positive integer or exceeds N_i (q_init > 1).

    """
    _check_n_init(expected_examples)
    if expected_examples > num_records:
        raise ConfigError(
            f"init_examples={expected_examples} exceeds the {num_records} records of "
            f"{client_id}: the DP initialisation samples each record with probability "
            f"init_examples/N_i = {expected_examples / num_records:.3g}, which must be ≤ 1; "
            f"lower --init-examples to at most {num_records}")
    return expected_examples / num_records


def poisson_included(draws: torch.Tensor, sampling_probability: float) -> list[int]:
    """Indices of the records whose uniform draw falls below q.

    The comparison runs in float64: in float32 a rate such as 1e-8 would round and the
    realised inclusion probability would no longer be the q the ledger charges.
    """
    if not 0 < sampling_probability <= 1:
        raise ConfigError(f"sampling_probability={sampling_probability} must be in (0, 1]")
    uniforms = draws.to(torch.float64)
    return torch.nonzero(uniforms < sampling_probability).flatten().tolist()


def _batches(
    dataset: torch.utils.data.Dataset, collate: Callable, *, indices: Sequence[int],
    batch_size: int,
) -> Iterable[dict[str, torch.Tensor]]:
    subset = torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate)


def _check_indices(indices: Sequence[int], available: int) -> None:
    bad = [i for i in indices if not 0 <= i < available]
    if bad:
        raise ConfigError(f"record indices {bad[:5]} are outside the {available} records")


def raw_gradient_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    indices: Sequence[int],
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Σ over the records at ``indices`` of ∇_W loss, unclipped (public or non-private data)."""
    _check_indices(indices, len(dataset))
    sums = {name: torch.zeros(layer.weight.shape, dtype=trainable_dtype(layer.weight.dtype))
            for name, layer in targets.items()}
    device = device_of(model)
    with _TargetGradients(model, targets):
        for batch in _batches(dataset, collate, indices=indices, batch_size=batch_size):
            example_losses(model, to_device(batch, device), task=task).sum().backward()
            for name, layer in targets.items():
                sums[name] += layer.weight.grad.to("cpu", sums[name].dtype)
                layer.weight.grad = None
    return sums


def clipped_gradient_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    indices: Sequence[int],
    max_grad_norm: float,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Σ over the records at ``indices`` of each example's gradient clipped jointly to C.

    Per-example gradients come from Opacus' per-sample-gradient hooks on the target layers;
    one example's contribution to the returned sum has norm ≤ ``max_grad_norm`` over all
    targets together.
    """
    from opacus import GradSampleModule

    _check_indices(indices, len(dataset))
    if not max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm={max_grad_norm} must be > 0")
    # float32 (or wider) on the CPU, like every tensor that leaves the model (fedsb_dp.devices): the
    # clip and the noise must not run at a bfloat16 base's precision.
    sums = {name: torch.zeros(layer.weight.shape, dtype=trainable_dtype(layer.weight.dtype))
            for name, layer in targets.items()}
    if not indices:
        return sums
    device = device_of(model)
    with _TargetGradients(model, targets):
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            for batch in _batches(dataset, collate, indices=indices, batch_size=batch_size):
                batch = to_device(batch, device)
                example_losses(wrapped, batch, task=task).sum().backward()
                per_example = {n: layer.weight.grad_sample.to(sums[n].dtype)
                               for n, layer in targets.items()}
                factor = clip_factors(joint_norms(per_example.values()), max_grad_norm)
                for name, g in per_example.items():
                    sums[name] += torch.einsum("b,b...->...", factor, g).cpu()
                wrapped.zero_grad(set_to_none=True)
        finally:
            wrapped._close()
    return sums


def sampled_clipped_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    draws: torch.Tensor,
    sampling_probability: float,
    max_grad_norm: float,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """The pre-noise statistic of the DP initialisation.

    Record ``j`` is in the sum iff ``draws[j] < sampling_probability``. Each record's
    membership depends on its own draw only, so adding or removing one record (with the
    other records keeping their draws) moves the sum by at most ``max_grad_norm``.

    Args:
        model: Model whose target weights get the gradients.
        targets: Target linear layers by qualified name.
        dataset: The client's records.
        collate: Batch collate function.
        task: Loss type.
        draws: One uniform [0, 1) draw per record of ``dataset``.
        sampling_probability: q_init.
        max_grad_norm: C_init.
        batch_size: Physical batch size (memory only).

    Returns:
        Layer name → Σ of the sampled records' jointly clipped gradients.

    """
    if draws.shape != (len(dataset),):
        raise ConfigError(f"draws has shape {tuple(draws.shape)}; need one draw per record "
                          f"({len(dataset)})")
    return clipped_gradient_sum(
        model, targets, dataset, collate, task=task,
        indices=poisson_included(draws, sampling_probability), max_grad_norm=max_grad_norm,
        batch_size=batch_size)


def dp_gradient_sum(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    *,
    task: str,
    expected_examples: int,
    max_grad_norm: float,
    noise_multiplier: float,
    batch_size: int = 16,
    sampling_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    allow_nonprivate: bool = False,
    client_id: str = "the client",
) -> tuple[dict[str, torch.Tensor], Any]:
    """One client's noisy mean of Poisson-sampled clipped gradients, and the event it releases.

    Args:
        model: Model whose target weights get the gradients.
        targets: Target linear layers by qualified name.
        dataset: The client's records.
        collate: Batch collate function.
        task: Loss type.
        expected_examples: n_init, a public setting; each record is sampled with probability
            q_init = n_init / N_i, and the noisy sum is divided by n_init (never by the
            realised count, which would depend on which records were sampled).
        max_grad_norm: C_init, joint per-example clip norm over all targets.
        noise_multiplier: σ_init; noise std per coordinate of the sum is σ_init·C_init.
        batch_size: Physical batch size (memory only; the release is one sum).
        sampling_generator: Source of the inclusion draws; ``None`` draws from OS entropy.
        noise_generator: Noise source; ``None`` draws from OS entropy. Seeded generators make
            the run reproducible, which must be marked as such in the ledger.
        allow_nonprivate: Permit σ_init = 0 (then the event is ``NonPrivateDpEvent``).
        client_id: Name used in error messages.

    Returns:
        The noisy means and the event
        (``PoissonSampledDpEvent(q_init, GaussianDpEvent(σ_init))``).

    Raises:
        ConfigError: For σ_init < 0 (or 0 without ``allow_nonprivate``), C_init ≤ 0, or
            n_init > N_i.

    """
    if noise_multiplier < 0 or (noise_multiplier == 0 and not allow_nonprivate):
        raise ConfigError(
            f"noise_multiplier={noise_multiplier} for the DP initialisation must be > 0 "
            "(σ_init = 0 is non-private and needs allow_nonprivate=True)"
        )
    if not max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm={max_grad_norm} must be > 0")
    rate = init_sampling_probability(expected_examples, len(dataset), client_id=client_id)
    draws = torch.rand(len(dataset), generator=sampling_generator or os_entropy_generator(),
                       dtype=torch.float64)
    sums = sampled_clipped_sum(
        model, targets, dataset, collate, task=task, draws=draws, sampling_probability=rate,
        max_grad_norm=max_grad_norm, batch_size=batch_size,
    )
    if noise_multiplier == 0:
        return {n: s / expected_examples for n, s in sums.items()}, NonPrivateDpEvent()
    generator = noise_generator or os_entropy_generator()
    std = noise_multiplier * max_grad_norm
    noisy = {
        name: (s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype))
        / expected_examples
        for name, s in sums.items()
    }
    return noisy, dp_init_event(expected_examples, len(dataset),
                                noise_multiplier=noise_multiplier, client_id=client_id)


def dp_init_event(expected_examples: int, num_records: int, *, noise_multiplier: float,
                  client_id: str = "the client") -> PoissonSampledDpEvent:
    """What one client's DP gradient-SVD init releases: SGM(n_init / N_i, σ_init)."""
    return sampled_gaussian_event(
        sampling_probability=init_sampling_probability(expected_examples, num_records,
                                                       client_id=client_id),
        noise_multiplier=noise_multiplier)


def gradient_svd_init(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    datasets: Mapping[str, torch.utils.data.Dataset],
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
    sampling_generators: Mapping[str, torch.Generator] | None = None,
    noise_generators: Mapping[str, torch.Generator] | None = None,
    allow_nonprivate: bool = False,
) -> InitResult:
    """LoRA-SB's gradient-SVD initialisation over one or more data holders.

    ``dp``: every client contributes its noisy mean over a Poisson sample of its own records
    (rate n_init / N_i). ``public`` / ``nonprivate``: each data holder contributes the raw
    gradient sum over its first min(n_init, size) records. The server adds the contributions
    and runs sign + SVD once, so every client receives identical factors.

    Args:
        model: The model before adapter injection.
        targets: Target linear layers.
        datasets: Data holder id → dataset. For ``source="public"`` this is the public
            dataset (keyed by its name) and never a client's records; no client is charged.
        collate: Batch collate function.
        task: Loss type.
        rank: r.
        source: ``"public"``, ``"dp"`` or ``"nonprivate"``.
        n_init: Expected records per client (``dp``), or records per data holder.
        lr_eff: Scale of R⁰.
        zero_r: R⁰ = 0.
        max_grad_norm: C_init (``dp`` only).
        noise_multiplier: σ_init (``dp`` only).
        batch_size: Physical batch size.
        sampling_generators: Client id → inclusion-draw source for ``dp`` (default: OS
            entropy).
        noise_generators: Client id → noise source for ``dp`` (default: OS entropy).
        allow_nonprivate: Required for ``source="nonprivate"`` (and σ_init = 0).

    Returns:
        The factors, the per-client event, and how many records each client was charged for
        (the expected count n_init in ``dp`` mode; the realised count is never reported, as
        it moves with the sampled records).

    """
    if source not in GRADIENT_SOURCES:
        raise ConfigError(f"init source={source!r} is not one of {GRADIENT_SOURCES}")
    if not datasets:
        raise ConfigError("gradient-svd initialisation needs at least one dataset")
    _check_n_init(n_init)
    total: dict[str, torch.Tensor] = {n: torch.zeros_like(t.weight) for n, t in targets.items()}
    event: Any = NoOpDpEvent()
    events: dict[str, Any] = {}
    used: dict[str, int] = {}
    if source == "dp":
        if max_grad_norm is None or noise_multiplier is None:
            raise ConfigError("source='dp' needs max_grad_norm (C_init) and noise_multiplier")
        for cid, dataset in datasets.items():
            init_sampling_probability(n_init, len(dataset), client_id=cid)  # all before any
        for cid, dataset in datasets.items():
            sums, events[cid] = dp_gradient_sum(
                model, targets, dataset, collate, task=task, expected_examples=n_init,
                max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                batch_size=batch_size,
                sampling_generator=(sampling_generators or {}).get(cid),
                noise_generator=(noise_generators or {}).get(cid),
                allow_nonprivate=allow_nonprivate, client_id=cid,
            )
            used[cid] = n_init
            for name in total:
                total[name] += sums[name]
        event = next(iter(events.values()))
    else:
        if source == "nonprivate" and not allow_nonprivate:
            raise ConfigError(
                "source='nonprivate' reads raw private gradients (ε = ∞); pass "
                "allow_nonprivate=True to do it anyway, or use 'dp', 'public', "
                "'w0-svd' or 'random-orthonormal'"
            )
        for cid, dataset in datasets.items():
            count = min(n_init, len(dataset))
            sums = raw_gradient_sum(model, targets, dataset, collate, task=task,
                                    indices=range(count), batch_size=batch_size)
            used[cid] = count
            for name in total:
                total[name] += sums[name]
        event = NonPrivateDpEvent() if source == "nonprivate" else NoOpDpEvent()
        events = {cid: event for cid in datasets} if source == "nonprivate" else {}
    factors = factors_from_gradients(total, rank=rank, lr_eff=lr_eff, zero_r=zero_r)
    return InitResult(
        method="gradient-svd", factors=factors, event=event, source=source,
        examples_used={} if source == "public" else used, events=events,
        details={
            "rank": rank, "n_init": n_init, "lr_eff": lr_eff, "zero_r": zero_r,
            "max_grad_norm": max_grad_norm, "noise_multiplier": noise_multiplier,
            "public_datasets": list(datasets) if source == "public" else [],
            "noise_seeded": noise_generators is not None,
        },
    )
