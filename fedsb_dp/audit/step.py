"""Step-level many-run audit of the client's clip + noise step (docs/privacy.md, "Auditing").

The toolkit's DP-SGD step is run on D and on D' = D ∪ {canary}, where the canary's per-example
gradient points along a unit direction u of R-space, and the released update is projected on u.
For q = 1 the step is exactly (1/σ)-GDP, so the fitted μ̂ should match 1/σ and the GDP-fit
ε lower bound should sit just below the accountant's claim; a broken step (less noise, a larger
clip, no clipping, noise on the mean) pushes the lower bound above the claim.

What is the real code path and what is vectorised:

* The optimizer is built by :meth:`fedsb_dp.federated.client.DPClient._optimizer` (Opacus
  ``DPOptimizer`` with the client's σ, C, expected batch size and ``loss_reduction="mean"``).
* The records' per-example gradients come from Opacus' ``GradSampleModule`` on a tiny model whose
  only trainable tensor is an SBLinear-style R (``nn.Linear(r, r, bias=False)`` between frozen
  A and B), through the audited run's own per-example loss (:func:`fedsb_dp.losses.example_losses`
  for its task: a classifier's cross-entropy, or a causal LM's mean over each record's own
  response tokens, on :class:`TinySBDecoder`); the canary's row is appended to ``p.grad_sample``
  exactly as the ``canary_gradients`` hook of ``DPClient.train_round`` does.
* Clipping and summing run once per world through the optimizer's own ``clip_and_accumulate``.
* The n draws of the rest of the step run in one call of the optimizer's own ``step()`` on a
  batched copy of R of shape (n, r, r): ``add_noise`` (Opacus ``_generate_noise`` with std σC on a
  (n, r, r) reference), ``scale_grad`` (÷ expected batch size) and the base optimizer's update,
  which is element-wise, so each of the n slices is one independent release. Only the clipping
  inside that second ``step()`` is skipped, since the sum was already clipped.

:func:`real_step_matches` checks, draw for draw, that this batched release equals an ordinary
``optimizer.step()`` on R with the same noise generator state.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from accounting.accountants import compute_epsilon
from accounting.empirical import GdpFit, fit_gdp, gdp_epsilon
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client import DPClient, LocalTrainingConfig
from fedsb_dp.losses import example_losses
from fedsb_dp.models import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TASKS
from fedsb_dp.tasks.causal_lm import IGNORE_INDEX

CANARY_SCALE = 10.0  # the canary's raw gradient norm in units of C: clipping must bite


class TinySBModel(nn.Module):
    """``logits = B R A x`` with frozen A, B and a trainable R, like one SBLinear adapter."""

    def __init__(self, *, rank: int, in_features: int, classes: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("A", torch.linalg.qr(
            torch.randn(in_features, rank, generator=generator))[0].T.contiguous())
        self.register_buffer("B", torch.linalg.qr(
            torch.randn(classes, rank, generator=generator))[0].contiguous())
        self.R = nn.Linear(rank, rank, bias=False)
        with torch.no_grad():
            self.R.weight.copy_(0.1 * torch.randn(rank, rank, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of feature vectors."""
        return F.linear(self.R(F.linear(x, self.A)), self.B)


class _SBStack(nn.Module):
    """Frozen token embedding, then ``B R A``: the decoder stack of :class:`TinySBDecoder`."""

    def __init__(self, *, rank: int, vocab: int, hidden: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.embed.weight.requires_grad_(False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=generator))
        self.core = TinySBModel(rank=rank, in_features=hidden, classes=hidden,
                                generator=generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> SimpleNamespace:
        """Hidden states (batch, length, hidden), shaped like a ``transformers`` output."""
        del position_ids  # one position-free layer: no attention, no positions
        hidden = self.core(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return SimpleNamespace(last_hidden_state=hidden)


class TinySBDecoder(nn.Module):
    """A causal LM whose only trainable tensor is an SB R: the step audit's decoder records.

    It has what :func:`fedsb_dp.tasks.causal_lm.response_losses` reads from a real decoder
    (``get_decoder``, ``get_output_embeddings``, ``config.final_logit_softcapping``), so the
    records' per-example losses are the causal-LM task's own.
    """

    def __init__(self, *, rank: int, vocab: int, generator: torch.Generator) -> None:
        super().__init__()
        hidden = 2 * rank
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.decoder = _SBStack(rank=rank, vocab=vocab, hidden=hidden, generator=generator)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight.requires_grad_(False)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=generator))

    @property
    def R(self) -> nn.Linear:
        """The trained r×r matrix."""
        return self.decoder.core.R

    def get_decoder(self) -> nn.Module:
        """The stack that yields the hidden states."""
        return self.decoder

    def get_output_embeddings(self) -> nn.Module:
        """The frozen LM head."""
        return self.head


def _lm_batch(records: int, *, vocab: int, generator: torch.Generator,
              length: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt response`` records with 1–3 response tokens of their own."""
    ids = torch.randint(1, vocab, (records, length), generator=generator)
    lengths = torch.randint(4, length + 1, (records,), generator=generator)
    responses = torch.randint(1, 4, (records,), generator=generator)
    position = torch.arange(length).unsqueeze(0)
    mask = (position < lengths.unsqueeze(1)).long()
    in_response = (position >= (lengths - responses).unsqueeze(1)) & mask.bool()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
            "labels": torch.where(in_response, ids, torch.full_like(ids, IGNORE_INDEX))}


@dataclass(frozen=True)
class StepAuditResult:
    """Outcome of :func:`step_audit`.

    Attributes:
        noise_multiplier: σ of the client configuration.
        max_grad_norm: C.
        expected_batch_size: b (= |D|, so q = 1).
        draws: Releases per world.
        delta: δ at which ε is compared.
        mu_true: 1/σ, the GDP parameter of a correct step.
        fit: The GDP fit of the projected releases.
        epsilon_lower: GDP-fit ε lower bound (from the fit's lower confidence bound on μ).
        epsilon_hat: ε of the point estimate μ̂.
        epsilon_claimed: ε the accountant claims for this step (PRV upper bound).
        epsilon_true: ε(δ) of (1/σ)-GDP, the exact value for a correct step.
        mutation: Name of the mutant under test (``None`` for the real code).
        task: Whose per-example loss produced the records' gradients.
    """

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    draws: int
    delta: float
    mu_true: float
    fit: GdpFit
    epsilon_lower: float
    epsilon_hat: float
    epsilon_claimed: float
    epsilon_true: float
    mutation: str | None = None
    task: str = SEQUENCE_CLASSIFICATION

    @property
    def mu_hat(self) -> float:
        """Fitted μ."""
        return self.fit.mu_hat

    @property
    def flagged(self) -> bool:
        """True when the lower bound exceeds the claim: the step leaks more than accounted."""
        return self.epsilon_lower > self.epsilon_claimed

    @property
    def recovered(self) -> float:
        """ε lower bound as a fraction of the true ε of a correct step."""
        return self.epsilon_lower / self.epsilon_true

    def as_row(self) -> dict[str, object]:
        """A flat dictionary for tables."""
        return {"mutation": self.mutation or "none", "task": self.task,
                "sigma": self.noise_multiplier,
                "draws": self.draws, "mu_true": self.mu_true, "mu_hat": self.mu_hat,
                "mu_lower": self.fit.mu_lower, "epsilon_lower": self.epsilon_lower,
                "epsilon_hat": self.epsilon_hat, "epsilon_claimed": self.epsilon_claimed,
                "epsilon_true": self.epsilon_true, "recovered": self.recovered,
                "flagged": self.flagged}


def _per_example_grads(model: nn.Module, records: int, *, task: str, features: int,
                       classes: int, generator: torch.Generator) -> torch.Tensor:
    """Real Opacus per-example gradients of R for ``records`` random examples of ``task``."""
    if task == CAUSAL_LM:
        batch = _lm_batch(records, vocab=classes, generator=generator)
    else:
        batch = {"x": torch.randn(records, features, generator=generator),
                 "labels": torch.randint(0, classes, (records,), generator=generator)}
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        if task == CAUSAL_LM:
            losses = example_losses(private, batch, task=task)
        else:
            losses = F.cross_entropy(private(batch["x"]), batch["labels"], reduction="none")
        losses.mean().backward()  # the client's reduction: Opacus rescales to per-example grads
        return model.R.weight.grad_sample.detach().clone()
    finally:
        private._close()


class _StepHarness:
    """One client step on a tiny SB model; releases many noisy updates per world."""

    def __init__(self, config: LocalTrainingConfig, *, rank: int, seed: int,
                 task: str = SEQUENCE_CLASSIFICATION) -> None:
        if task not in TASKS:
            raise ConfigError(f"task={task!r} is not one of {TASKS}")
        self.config = config
        self.rank = rank
        gen = torch.Generator().manual_seed(seed)
        self.features, self.classes = 2 * rank, rank
        if task == CAUSAL_LM:
            self.classes = 4 * rank  # the vocabulary of the tiny decoder
            self.model: nn.Module = TinySBDecoder(rank=rank, vocab=self.classes, generator=gen)
        else:
            self.model = TinySBModel(rank=rank, in_features=self.features,
                                     classes=self.classes, generator=gen)
        self.param = self.model.R.weight
        self.theta = self.param.detach().clone()
        self.u = torch.randn(rank, rank, generator=gen)
        self.u /= self.u.norm()
        # A DPClient only to reach its optimizer factory: the audited configuration.
        self.client = DPClient("audit", [{}] * config.expected_batch_size, list, task=task)
        self.records = _per_example_grads(self.model, config.expected_batch_size, task=task,
                                          features=self.features, classes=self.classes,
                                          generator=gen)
        self.param.grad = None

    def optimizer(self, params: list[nn.Parameter], generator: torch.Generator) -> DPOptimizer:
        return self.client._optimizer(params, self.config, generator)

    def _load_grad_sample(self, with_canary: bool) -> None:
        rows = self.records
        if with_canary:
            canary = (CANARY_SCALE * self.config.max_grad_norm * self.u).unsqueeze(0)
            rows = torch.cat([rows, canary])
        with torch.no_grad():
            self.param.copy_(self.theta)
        self.param.grad = None
        self.param.grad_sample = rows.clone()

    def clipped_sum(self, with_canary: bool) -> torch.Tensor:
        """Σ clip(g_i) through the optimizer's own clipping (canary appended in D')."""
        self._load_grad_sample(with_canary)
        optimizer = self.optimizer([self.param], torch.Generator())
        optimizer.clip_and_accumulate()
        summed = self.param.summed_grad.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        return summed

    def releases(self, with_canary: bool, draws: int, generator: torch.Generator) -> torch.Tensor:
        """``draws`` independent updated copies of R, shape (draws, r, r)."""
        summed = self.clipped_sum(with_canary)
        batched = nn.Parameter(self.theta.expand(draws, *self.theta.shape).clone())
        optimizer = self.optimizer([batched], generator)
        # The sum is already clipped per example on the real R; the batched copy only carries
        # it through the rest of DPOptimizer.step (noise, scaling, base update).
        optimizer.clip_and_accumulate = lambda: None
        batched.summed_grad = summed.expand(draws, *summed.shape).clone()
        batched.grad_sample = torch.zeros((1, *batched.shape))  # one accumulated batch
        optimizer.step()
        return batched.detach()

    def real_step(self, with_canary: bool, generator: torch.Generator) -> torch.Tensor:
        """One ordinary ``optimizer.step()`` on R, for checking :meth:`releases`."""
        self._load_grad_sample(with_canary)
        optimizer = self.optimizer([self.param], generator)
        optimizer.step()
        out = self.param.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        return out

    def scores(self, released: torch.Tensor) -> np.ndarray:
        """⟨θ_t − θ_{t+1}, u⟩ in units of lr·C/b (a correct step shifts it by 1 for D')."""
        unit = (self.config.learning_rate * self.config.max_grad_norm
                / self.config.expected_batch_size)
        delta = (self.theta.unsqueeze(0) - released).reshape(len(released), -1)
        return (delta.double() @ self.u.reshape(-1).double()).numpy() / unit


def _config(noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
            learning_rate: float, optimizer: str) -> LocalTrainingConfig:
    if not noise_multiplier > 0:
        raise ConfigError(f"noise_multiplier={noise_multiplier} must be > 0 to audit a DP step")
    return LocalTrainingConfig(expected_batch_size=expected_batch_size, local_steps=1,
                               learning_rate=learning_rate, optimizer=optimizer,
                               max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier)


def step_audit(
    noise_multiplier: float = 1.0,
    *,
    max_grad_norm: float = 1.0,
    expected_batch_size: int = 8,
    rank: int = 4,
    draws: int = 100_000,
    delta: float = 1e-5,
    confidence: float = 0.95,
    learning_rate: float = 1.0,
    optimizer: str = "sgd",
    seed: int = 0,
    mutation: str | None = None,
    task: str = SEQUENCE_CLASSIFICATION,
) -> StepAuditResult:
    """Audit one client step with ``draws`` releases on D and on D' = D ∪ {canary}.

    D has ``expected_batch_size`` records, so q = 1 and the correct step is (1/σ)-GDP. SGD is the
    default base optimizer because its update is linear in the noisy gradient (AdamW's first step
    is ≈ lr·sign(g), post-processing that would only weaken the test); the mechanism audited —
    clipping and noise — is the same for both.

    Args:
        noise_multiplier: σ.
        max_grad_norm: C.
        expected_batch_size: b, also |D| (q = 1); must be > 1 so that noise on the mean differs.
        rank: r of the SB-style R.
        draws: Releases per world (≥ 1e5 for the reference figures).
        delta: δ at which ε is compared.
        confidence: Level of the one-sided lower confidence bound on μ.
        learning_rate: Step size (scores are normalised by it).
        optimizer: ``"sgd"`` or ``"adamw"``.
        seed: Seed of the data, canary direction and noise (the audit, not a private run).
        mutation: Label reported with the result (set by mutation tests).
        task: The audited run's task; its per-example loss gives the records' gradients
            (``"causal-lm"``: response-token losses on :class:`TinySBDecoder`).

    Returns:
        The fit, the ε lower bound and the claim.
    """
    config = _config(noise_multiplier, max_grad_norm, expected_batch_size, learning_rate,
                     optimizer)
    if draws < 2:
        raise ConfigError(f"draws={draws} must be ≥ 2")
    harness = _StepHarness(config, rank=rank, seed=seed, task=task)
    noise = torch.Generator().manual_seed(seed + 1)
    out_scores = harness.scores(harness.releases(False, draws, noise))
    in_scores = harness.scores(harness.releases(True, draws, noise))
    fit = fit_gdp(in_scores, out_scores, confidence=confidence)
    claimed = compute_epsilon(config.step_event(expected_batch_size), delta=delta).epsilon
    return StepAuditResult(
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, draws=draws, delta=delta,
        mu_true=1.0 / noise_multiplier, fit=fit, epsilon_lower=fit.epsilon_lower(delta),
        epsilon_hat=fit.epsilon_hat(delta), epsilon_claimed=claimed,
        epsilon_true=gdp_epsilon(1.0 / noise_multiplier, delta), mutation=mutation, task=task)


def real_step_matches(noise_multiplier: float = 1.0, *, draws: int = 20, seed: int = 0,
                      **kwargs: object) -> bool:
    """Whether each batched release equals an ordinary ``DPOptimizer.step()`` bit for bit.

    Draw i of the batched path is compared with a real step whose noise generator is seeded
    so that it draws the same numbers (one (r, r) draw per step).
    """
    config = _config(noise_multiplier, float(kwargs.get("max_grad_norm", 1.0)),
                     int(kwargs.get("expected_batch_size", 8)),
                     float(kwargs.get("learning_rate", 1.0)), str(kwargs.get("optimizer", "sgd")))
    harness = _StepHarness(config, rank=int(kwargs.get("rank", 4)), seed=seed,
                           task=str(kwargs.get("task", SEQUENCE_CLASSIFICATION)))
    for with_canary in (False, True):
        for i in range(draws):
            batched = harness.releases(with_canary, 1, torch.Generator().manual_seed(1000 + i))
            real = harness.real_step(with_canary, torch.Generator().manual_seed(1000 + i))
            if not torch.equal(batched[0], real):
                return False
    return True


def epsilon_table(results: list[StepAuditResult]) -> object:
    """The results as a pandas DataFrame (one row each)."""
    import pandas as pd

    return pd.DataFrame([r.as_row() for r in results])


__all__ = ["StepAuditResult", "TinySBDecoder", "TinySBModel", "epsilon_table",
           "real_step_matches", "step_audit"]
