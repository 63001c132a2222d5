"""A federated client's local DP-SGD over R (and the head): Opacus clipping and noise.

Record-level DP per client: every logical step draws a Poisson batch (each record in with
probability ``q = expected_batch_size / N_i``), clips each example's gradient of the trainable
tensors to ``max_grad_norm`` with Opacus' per-sample gradients, adds ``N(0, σ²C²)`` to the sum
and divides by the *expected* batch size — a public constant, never the realised size. One
logical step is one ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``; empty Poisson batches
still step (noise only) and still count.

A logical batch larger than ``max_physical_batch_size`` is processed in chunks whose clipped
gradients Opacus accumulates before noising once, so memory is bounded without changing the
mechanism.

A record whose loss or per-example gradient is NaN/inf contributes a zero gradient (zeroed
before clipping): its sensitivity stays within C and no single record can change the run's
control flow (stop it, or skip a step). Only a non-finite *release* — a client's noised update —
stops a run, and that is a function of released values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from accounting.events import PoissonSampledDpEvent, sampled_gaussian_event
from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.adapters.inject import frozen_fingerprint, train_only, trainable_state
from fedsb_dp.devices import device_of, to_device
from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.losses import example_losses
from fedsb_dp.rng import RandomStreams

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


class NonFiniteUpdateError(FedSBError, FloatingPointError):
    """A client's update (after noise) holds NaN/inf values; the round is discarded.

    The message may name the client: it is for the operator, never for a released file.
    """


#: The former name, from when a single non-finite loss stopped the run.
NonFiniteLossError = NonFiniteUpdateError


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How a client trains in one round.

    Attributes:
        expected_batch_size: b; the Poisson rate is b / N_i and the noisy sum is divided by b.
        local_steps: Logical DP-SGD steps per round (K).
        learning_rate: Optimizer step size.
        optimizer: ``"adamw"`` or ``"sgd"``.
        max_grad_norm: C, per-example clip norm over all trainable tensors jointly.
        noise_multiplier: σ (noise std σ·C on the sum); 0 only for non-private runs.
        max_physical_batch_size: Largest chunk run through the model at once (memory only).
        weight_decay: AdamW weight decay.

    """

    expected_batch_size: int
    local_steps: int
    learning_rate: float
    optimizer: str
    max_grad_norm: float
    noise_multiplier: float
    max_physical_batch_size: int = 32
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("expected_batch_size", "local_steps", "max_physical_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0")
        if not self.noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier={self.noise_multiplier} must be ≥ 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be ≥ 0")

    def step_event(self, num_records: int) -> PoissonSampledDpEvent:
        """The event of one logical step on a client holding ``num_records`` records."""
        return sampled_gaussian_event(
            sampling_probability=sampling_probability(self.expected_batch_size, num_records),
            noise_multiplier=self.noise_multiplier)


def sampling_probability(expected_batch_size: int, num_records: int) -> float:
    """Q = b / N, which must lie in (0, 1].

    Raises:
        ConfigError: If the client holds fewer records than the expected batch size.

    """
    if num_records < 1:
        raise ConfigError(f"a client holds {num_records} records; it needs at least one")
    if expected_batch_size > num_records:
        raise ConfigError(
            f"expected batch size {expected_batch_size} exceeds a client's {num_records} "
            "records (sampling probability would be > 1): lower --batch-size or use fewer "
            "clients"
        )
    return expected_batch_size / num_records


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after a round.

    Attributes:
        client_id: The sender.
        state: Trainable tensors after local training (R of every layer, head if trained).
        steps: Logical DP-SGD steps actually executed.
        event: The privacy event of one step (the client ran ``steps`` of them).
        fingerprint: Hash of the frozen factors the client trained against.

    """

    client_id: str
    state: dict[str, torch.Tensor]
    steps: int
    event: PoissonSampledDpEvent
    fingerprint: str


def poisson_indices(num_records: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``num_records`` records is in with probability q.

    The uniforms are float64 and compared with q in float64. In float32 they lie on a 2⁻²⁴
    grid and q is rounded to float32 (1 − 2⁻³⁰ becomes 1, 1e−50 becomes 0), so the realised
    inclusion rate would differ from the q the accountant is charged with.

    Args:
        num_records: N, the client's record count.
        q: Sampling probability in (0, 1].
        generator: Source of the draws (the run's ``poisson`` stream).

    Returns:
        The sampled indices, ascending (possibly none).
    """
    uniforms = torch.rand(num_records, generator=generator, dtype=torch.float64)
    return torch.nonzero(uniforms < q).flatten()


def zero_nonfinite_examples(params: list[nn.Parameter]) -> int:
    """Zero, in every parameter's ``grad_sample``, the rows of examples with a NaN/inf entry.

    An example's gradient is judged jointly over all trainable tensors (the clipping unit), so
    a zeroed example contributes exactly nothing. Must run before the optimizer clips.

    Args:
        params: The trainable parameters, each holding an Opacus ``grad_sample`` of shape
            ``(batch, *p.shape)``.

    Returns:
        How many examples were zeroed (for the operator's log only: it is data-dependent).
    """
    samples = [p.grad_sample for p in params if isinstance(p.grad_sample, torch.Tensor)]
    if not samples or samples[0].shape[0] == 0:
        return 0
    finite = torch.ones(samples[0].shape[0], dtype=torch.bool, device=samples[0].device)
    for sample in samples:
        finite &= torch.isfinite(sample.reshape(sample.shape[0], -1)).all(dim=1)
    bad = int((~finite).sum())
    if bad:
        for sample in samples:
            # where() rather than multiplying by a 0/1 mask: 0 · inf would stay NaN.
            sample.copy_(torch.where(finite.view(-1, *([1] * (sample.dim() - 1))),
                                     sample, torch.zeros((), dtype=sample.dtype,
                                                         device=sample.device)))
    return bad


def _append_rows(params: list[nn.Parameter],
                 rows: Mapping[nn.Parameter, torch.Tensor]) -> None:
    """Append audit canaries' per-example gradient rows to every parameter's grad_sample."""
    if not rows:
        return
    counts = {int(rows[p].shape[0]) for p in params if p in rows}
    if len(counts) > 1 or any(p not in rows for p in params):
        raise ConfigError(f"canary_gradients must give every trainable parameter the same "
                          f"number of rows; got row counts {sorted(counts)} for "
                          f"{sum(p in rows for p in params)} of {len(params)} parameters")
    for p in params:
        extra = rows[p].to(device=p.device, dtype=p.dtype)
        if tuple(extra.shape[1:]) != tuple(p.shape):
            raise ConfigError(f"canary rows of shape {tuple(extra.shape)} do not fit a "
                              f"parameter of shape {tuple(p.shape)}")
        p.grad_sample = torch.cat([p.grad_sample, extra])


class DPClient:
    """One data holder: its records and its local DP-SGD loop.

    Args:
        client_id: Identifier used in the ledger.
        dataset: The client's records (a map-style dataset yielding dicts with ``labels``).
        collate: Turns a list of examples into a padded batch.
        task: ``"sequence-classification"`` or ``"causal-lm"``.

    """

    def __init__(
        self,
        client_id: str,
        dataset: torch.utils.data.Dataset,
        collate: Callable,
        *,
        task: str,
    ) -> None:
        if len(dataset) == 0:
            raise ConfigError(f"client {client_id!r} has no records")
        self.client_id = client_id
        self.dataset = dataset
        self.collate = collate
        self.task = task

    @property
    def num_records(self) -> int:
        """N_i (treated as public)."""
        return len(self.dataset)

    def _optimizer(self, params: list[nn.Parameter], config: LocalTrainingConfig,
                   noise_generator: torch.Generator) -> DPOptimizer:
        if config.optimizer == "adamw":
            base = torch.optim.AdamW(params, lr=config.learning_rate,
                                     weight_decay=config.weight_decay)
        else:
            base = torch.optim.SGD(params, lr=config.learning_rate)
        return DPOptimizer(
            base,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=config.expected_batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )

    def train_round(
        self,
        private_model: nn.Module,
        global_state: Mapping[str, torch.Tensor],
        config: LocalTrainingConfig,
        *,
        noise_generator: torch.Generator,
        sampling_generator: torch.Generator,
        dropout_seed: int | None = None,
        on_step: Callable[[int], None] | None = None,
        canary_gradients: Callable[[int], Mapping[nn.Parameter, torch.Tensor]] | None = None,
    ) -> ClientUpdate:
        """Start from the global trainable state and run ``config.local_steps`` DP-SGD steps.

        Args:
            private_model: The model wrapped in Opacus' ``GradSampleModule`` (hooks mode).
            global_state: The server's current trainable tensors (R̄, head).
            config: Local training settings.
            noise_generator: Source of the DP noise (OS entropy unless the run is seeded).
            sampling_generator: Source of the Poisson batch draws.
            dropout_seed: Seed for dropout masks. Dropout draws from torch's global RNG, so the
                round runs inside ``torch.random.fork_rng`` seeded with this value and the
                caller's global RNG state is restored afterwards. ``None`` leaves it alone.
            on_step: Called with the step index after each logical step (progress bars).
            canary_gradients: Auditing only (``fedsb_dp.audit``): called with the step index
                before the step's noise is drawn; returns, for every trainable parameter, extra
                per-example gradient rows ``(k, *p.shape)`` appended to ``p.grad_sample`` so
                they are clipped, summed and noised like records. ``None`` (default) changes
                nothing.

        Returns:
            The client's update.

        Raises:
            FedSBError: If a frozen tensor changed during training.

        """
        model = private_model._module if hasattr(private_model, "_module") else private_model
        device = device_of(model)
        if noise_generator.device.type != device.type:
            raise ConfigError(f"the noise generator is on {noise_generator.device}, the model "
                              f"on {device}: Opacus draws the noise on the model's device")
        # Dropout on a GPU draws from that GPU's global generator: fork it too.
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            set_trainable_state(model, global_state)
            model.train()
            before = frozen_fingerprint(model, scope="all")
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = self._optimizer(params, config, noise_generator)
            q = sampling_probability(config.expected_batch_size, self.num_records)
            steps = 0
            for step in range(config.local_steps):
                indices = poisson_indices(self.num_records, q, sampling_generator)
                chunks = list(torch.split(indices, config.max_physical_batch_size)) or [indices]
                for position, chunk in enumerate(chunks):
                    if len(chunk) == 0:
                        # Empty Poisson batch: the step still happens, releasing noise only.
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype,
                                                        device=p.device)
                    else:
                        # Indices stay on the CPU (they index the dataset); the batch moves.
                        batch = to_device(self.collate([self.dataset[int(i)] for i in chunk]),
                                          device)
                        losses = example_losses(private_model, batch, task=self.task)
                        losses.mean().backward()
                        if zero_nonfinite_examples(params):
                            logger.debug("client %s, step %d: non-finite example gradient(s) "
                                         "zeroed before clipping", self.client_id, step)
                    if canary_gradients is not None and position == len(chunks) - 1:
                        _append_rows(params, canary_gradients(step))
                    optimizer.signal_skip_step(do_skip=position < len(chunks) - 1)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                steps += 1
                if on_step is not None:
                    on_step(step)
            if frozen_fingerprint(model, scope="all") != before:
                raise FedSBError(f"client {self.client_id!r}: a frozen tensor changed in training")
            state = trainable_state(model)
            if all(torch.equal(state[k], global_state[k].cpu()) for k in state):
                raise FedSBError(f"client {self.client_id!r}: no trainable tensor moved this round")
            return ClientUpdate(
                client_id=self.client_id,
                state=state,
                steps=steps,
                event=config.step_event(self.num_records),
                fingerprint=frozen_fingerprint(model),
            )


def _hook_trainable_modules(private_model: nn.Module) -> None:
    """Re-attach Opacus' per-sample-gradient hooks to the modules that train now.

    Opacus hooks the modules holding trainable parameters when it wraps the model; a module
    frozen since (RoLoRA's idle factor) would still receive backward hooks without captured
    activations, which Opacus refuses. Re-hooking is cheap and changes nothing when the
    trainable set is the one the model was wrapped with.
    """
    if not hasattr(private_model, "add_hooks"):
        return
    private_model.remove_hooks()
    private_model.add_hooks(loss_reduction=private_model.loss_reduction,
                            batch_first=private_model.batch_first,
                            force_functorch=private_model.force_functorch)


def train_instruction(
    client: DPClient,
    private_model: nn.Module,
    instruction: Any,
    streams: RandomStreams,
    *,
    on_step: Callable[[int], None] | None = None,
) -> ClientUpdate:
    """Carry out one round's :class:`~fedsb_dp.federated.protocol.Instruction` (both drivers).

    The client draws its batches, noise and dropout from the run's named streams at its
    stream index (OS entropy when unseeded), trains at its rank and returns what it sends:
    its state truncated to that rank.

    Raises:
        ConfigError: If the instruction is addressed to another client.

    """
    from fedsb_dp.methods import pad_state, set_active_rank, truncate_state

    if instruction.client_id != client.client_id:
        raise ConfigError(f"an instruction for {instruction.client_id!r} reached "
                          f"{client.client_id!r}")
    model = private_model._module if hasattr(private_model, "_module") else private_model
    # A lower-rank client receives only its leading block of R; the rest cannot move its
    # output, so zeros stand in for it while it trains.
    start = pad_state(instruction.state, trainable_state(model))
    index, t = instruction.stream_index, instruction.round_index
    set_active_rank(model, instruction.rank)
    try:
        # The client trains exactly what it was sent (RoLoRA: one factor, the other frozen).
        with train_only(model, instruction.state):
            _hook_trainable_modules(private_model)
            update = client.train_round(
                private_model, start, instruction.local,
                # Opacus draws the noise on the parameters' device, with this generator.
                noise_generator=streams.torch("noise", t, index, device=device_of(model)),
                sampling_generator=streams.torch("poisson", t, index),
                dropout_seed=streams.integer("dropout", t, index), on_step=on_step)
    finally:
        set_active_rank(model, None)
    if instruction.rank is None:
        return update
    return ClientUpdate(client_id=update.client_id,
                        state=truncate_state(update.state, instruction.rank),
                        steps=update.steps, event=update.event, fingerprint=update.fingerprint)
