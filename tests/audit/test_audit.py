"""Empirical audits of the real client step: the many-run step audit (with four mutants that
must be caught), the one-run canary audit through DPClient.train_round, and ``fedsb-dp audit``."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer

from fedsb_dp.adapters import (
    LayerFactors,
    SBConfig,
    find_target_modules,
    inject_adapters,
    random_orthonormal_init,
)
from fedsb_dp.audit.one_run import one_run_audit
from fedsb_dp.audit.step import real_step_matches, step_audit
from fedsb_dp.federated.client import DPClient, LocalTrainingConfig
from fedsb_dp.models import SEQUENCE_CLASSIFICATION

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "accounting"))
from test_run_audit import make_run  # noqa: E402  (the synthetic run-directory builder)

DRAWS = 100_000


def test_batched_release_is_the_real_optimizer_step():
    assert real_step_matches(1.0, draws=10)
    assert real_step_matches(0.5, draws=5, optimizer="adamw", learning_rate=0.1)


@pytest.mark.parametrize(("sigma", "epsilon_true"), [(0.5, 9.997), (1.0, 4.377), (2.0, 1.993)])
def test_step_audit_recovers_the_true_epsilon_and_stays_below_the_claim(sigma, epsilon_true):
    result = step_audit(sigma, draws=DRAWS)
    assert result.mu_hat == pytest.approx(1 / sigma, rel=0.02)
    assert result.epsilon_true == pytest.approx(epsilon_true, abs=1e-3)
    assert 0.95 <= result.recovered <= 1.0
    assert result.epsilon_lower <= result.epsilon_claimed
    assert not result.flagged


# ------------------------------------------------------------------ mutants of the DP step
# Each fixture patches one piece of Opacus' DPOptimizer as the client builds it; the audit of
# the patched step must flag it (lower bound above the accountant's claim for σ).


@pytest.fixture()
def noise_halved(monkeypatch):
    original = opacus_optimizer._generate_noise

    def half(std, reference, generator=None, secure_mode=False):
        return original(std / 2, reference, generator, secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", half)


@pytest.fixture()
def clip_too_large(monkeypatch):
    original = DPOptimizer.clip_and_accumulate

    def clip_at_1_2c(self):
        self.max_grad_norm, saved = 1.2 * self.max_grad_norm, self.max_grad_norm
        try:
            original(self)
        finally:
            self.max_grad_norm = saved  # noise still calibrated to C

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_at_1_2c)


@pytest.fixture()
def no_clipping(monkeypatch):
    original = DPOptimizer.clip_and_accumulate

    def unclipped(self):
        self.max_grad_norm, saved = float("inf"), self.max_grad_norm
        try:
            original(self)
        finally:
            self.max_grad_norm = saved

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped)


@pytest.fixture()
def noise_on_mean(monkeypatch):
    # Noise added to the mean instead of the sum: the clipped sum is divided by b first, and the
    # noise — already scaled down to the mean's sensitivity C/b — is then divided by b again as
    # if it still had to be averaged. The mean S/b carries noise σC/b² instead of σC/b.
    def add_noise_to_mean(self):
        for p in self.params:
            denominator = self.expected_batch_size * self.accumulated_iterations
            mean = p.summed_grad / denominator
            noise = opacus_optimizer._generate_noise(
                std=self.noise_multiplier * self.max_grad_norm / denominator, reference=mean,
                generator=self.generator)
            p.grad = (mean + noise / denominator).view_as(p)

    monkeypatch.setattr(DPOptimizer, "add_noise", add_noise_to_mean)
    monkeypatch.setattr(DPOptimizer, "scale_grad", lambda self: None)


@pytest.mark.parametrize("mutant", ["noise_halved", "clip_too_large", "no_clipping",
                                    "noise_on_mean"])
def test_step_audit_flags_every_mutant(mutant, request):
    request.getfixturevalue(mutant)
    result = step_audit(1.0, draws=DRAWS, mutation=mutant)
    assert result.flagged, (f"{mutant} not detected: ε lower bound {result.epsilon_lower:.3f} "
                            f"≤ claim {result.epsilon_claimed:.3f}")
    assert result.epsilon_lower > result.epsilon_claimed


# ------------------------------------------------------------------ one-run audit
# The one-run audit's small real setting: a test fixture (the audit takes any client).


class _TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with binary labels (the tiny audit setting's records)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.ids = torch.randint(1, 100, (n, 12), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.stack([e["labels"] for e in examples])}


def tiny_setting(*, records: int = 32, expected_batch_size: int = 16, local_steps: int = 16,
                 noise_multiplier: float = 3.0, max_grad_norm: float = 0.1, rank: int = 16,
                 learning_rate: float = 0.05, seed: int = 0):
    """A small real setting for the one-run audit.

    A 2-layer random BERT with SB adapters (r = 16 on query/value: an R-space of 1,024
    dimensions) and one client holding ``records`` random token records.

    Returns:
        The client, the model in ``GradSampleModule``, the training config, and a ``close``
        callable that removes Opacus' hooks.
    """
    from transformers import BertConfig, BertForSequenceClassification

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the random base model of the audit
        model = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, num_labels=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    sb = SBConfig(rank=rank, target_modules=("query", "value"))
    targets = find_target_modules(model, sb.target_modules, rank=rank)
    init = random_orthonormal_init(targets, rank=rank, seed=seed)
    inject_adapters(model, {n: LayerFactors(f.B, 0.01 * torch.randn(rank, rank, generator=gen),
                                            f.A) for n, f in init.factors.items()}, sb)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    client = DPClient("audit-client", _TokenDataset(records, gen), _collate,
                      task=SEQUENCE_CLASSIFICATION)
    config = LocalTrainingConfig(expected_batch_size=expected_batch_size,
                                 local_steps=local_steps, learning_rate=learning_rate,
                                 optimizer="sgd", max_grad_norm=max_grad_norm,
                                 noise_multiplier=noise_multiplier, max_physical_batch_size=64)
    return client, private, config, private._close


def test_canary_hook_with_no_rows_leaves_training_bit_identical():
    client, private, config, close = tiny_setting(local_steps=2)
    model = private._module
    start = {k: v.clone() for k, v in
             __import__("fedsb_dp.adapters", fromlist=["x"]).trainable_state(model).items()}

    def run(**kwargs):
        return client.train_round(private, start, config,
                                  noise_generator=torch.Generator().manual_seed(1),
                                  sampling_generator=torch.Generator().manual_seed(2),
                                  dropout_seed=3, **kwargs).state

    try:
        plain, hooked = run(), run(canary_gradients=lambda step: {})
    finally:
        close()
    assert all(torch.equal(plain[k], hooked[k]) for k in plain)


def test_one_run_audit_does_not_flag_the_real_step():
    client, private, config, close = tiny_setting()
    try:
        result = one_run_audit(client, private, config, canaries=1000, delta=1e-5)
    finally:
        close()
    assert result.steps == config.local_steps and result.sampling_probability == 0.5
    assert result.in_scores.mean() > result.out_scores.mean()  # canaries are in the sum
    assert 0 <= result.epsilon_lower <= result.bound.ceiling
    assert not result.flagged


def test_one_run_audit_flags_a_step_with_almost_no_noise(monkeypatch):
    original = opacus_optimizer._generate_noise
    monkeypatch.setattr(opacus_optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False:
                        original(std / 30, reference, generator, secure_mode))
    client, private, config, close = tiny_setting()
    try:
        result = one_run_audit(client, private, config, canaries=1000, delta=1e-5)
    finally:
        close()
    assert result.flagged, (result.epsilon_lower, result.epsilon_claimed)


def test_canary_rows_must_cover_every_parameter():
    client, private, config, close = tiny_setting(local_steps=1)
    model = private._module
    state = __import__("fedsb_dp.adapters", fromlist=["x"]).trainable_state(model)
    first = next(p for p in model.parameters() if p.requires_grad)
    try:
        with pytest.raises(Exception, match="same number of rows"):
            client.train_round(private, state, config,
                               noise_generator=torch.Generator().manual_seed(1),
                               sampling_generator=torch.Generator().manual_seed(2),
                               canary_gradients=lambda s: {first: torch.zeros(1, *first.shape)})
    finally:
        close()
    assert isinstance(client, DPClient)


# ------------------------------------------------------------------ CLI


def test_cli_audit_exit_codes(tmp_path, capsys):
    from fedsb_dp.cli import main

    clean = make_run(tmp_path / "clean")
    assert main(["audit", clean]) == 0
    assert "PASS" in capsys.readouterr().out
    seeded = make_run(tmp_path / "seeded", seed_mode="seeded")
    assert main(["audit", seeded, "--empirical", "--draws", "20000"]) == 1
    out = capsys.readouterr().out
    assert "SEEDED" in out and "empirical step audit" in out
    assert main(["audit", str(tmp_path / "missing")]) == 2


def test_cli_refuses_an_empirical_audit_of_a_client_level_run(tmp_path, capsys):
    # The step audit tests the record-level DP-SGD step; a client-level run's mechanism is
    # the server's clip + noise on ΔR, so auditing "its σ" there would report on another step.
    from accounting import PrivacyLedger
    from accounting.events import GaussianDpEvent, PoissonSampledDpEvent
    from fedsb_dp.cli import main

    run_dir = make_run(tmp_path / "client-level")
    ledger = PrivacyLedger(unit="client", dataset_sizes={"federation": 10}, target_epsilon=60.0,
                           target_delta=1e-5,
                           metadata={"dp_level": "client", "noise_multiplier": 1.0,
                                     "max_grad_norm": 0.1, "client_clip_norm": 1.0,
                                     "sampling": "poisson", "seed_mode": "os-entropy",
                                     "noise_is_release": True})
    ledger.record("federation", PoissonSampledDpEvent(1.0, GaussianDpEvent(1.0)), count=5,
                  round_index=0)
    os.remove(os.path.join(run_dir, "ledger.json"))  # save() refuses to rewrite a header
    ledger.save(os.path.join(run_dir, "ledger.json"))
    assert main(["audit", run_dir, "--empirical", "--draws", "2000"]) == 2
    captured = capsys.readouterr()
    assert "client-level run (ledger unit 'client'" in captured.err
    assert "without --empirical" in captured.err
    assert "empirical step audit" not in captured.out


# ------------------------------------------------------------------ causal-LM runs


def test_decoder_records_are_each_records_own_response_loss_gradient():
    # The causal-LM harness's records must be what the run's client clips: each record's own
    # gradient of its mean response-token loss (a batch-wide divisor or a sum would not be).
    from fedsb_dp.audit.step import TinySBDecoder, _lm_batch, _per_example_grads
    from fedsb_dp.tasks.causal_lm import response_losses

    gen = torch.Generator().manual_seed(3)
    model = TinySBDecoder(rank=4, vocab=16, generator=gen)
    state = torch.Generator().manual_seed(5).get_state()
    rows = _per_example_grads(model, 6, task="causal-lm", features=8, classes=16,
                              generator=torch.Generator().set_state(state))
    batch = _lm_batch(6, vocab=16, generator=torch.Generator().set_state(state))
    for i in range(6):
        model.R.weight.grad = None
        response_losses(model, {k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        torch.testing.assert_close(rows[i], model.R.weight.grad, rtol=1e-5, atol=1e-6)


def test_step_audit_of_a_causal_lm_step_recovers_epsilon_and_flags_halved_noise(monkeypatch):
    assert real_step_matches(1.0, draws=3, task="causal-lm")
    result = step_audit(1.0, draws=DRAWS, task="causal-lm")
    assert result.task == "causal-lm" and not result.flagged
    assert result.mu_hat == pytest.approx(1.0, rel=0.02) and 0.95 <= result.recovered <= 1.0
    original = opacus_optimizer._generate_noise
    monkeypatch.setattr(opacus_optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False:
                        original(std / 2, reference, generator, secure_mode))
    assert step_audit(1.0, draws=DRAWS, task="causal-lm").flagged


def _with_task(run_dir, task):
    import hashlib
    import json

    path = os.path.join(run_dir, "config.json")
    config = json.load(open(path, encoding="utf-8"))
    config["config"]["task"] = task
    config["digest"] = hashlib.sha256(json.dumps(config["config"], sort_keys=True)
                                      .encode()).hexdigest()
    json.dump(config, open(path, "w", encoding="utf-8"))
    provenance = json.load(open(os.path.join(run_dir, "provenance.json"), encoding="utf-8"))
    provenance["config_digest"] = config["digest"]
    json.dump(provenance, open(os.path.join(run_dir, "provenance.json"), "w", encoding="utf-8"))
    return run_dir


def test_cli_empirical_audit_uses_the_runs_task_and_refuses_an_unknown_one(tmp_path, capsys):
    from fedsb_dp.cli import main

    decoder_run = _with_task(make_run(tmp_path / "lm"), "causal-lm")
    assert main(["audit", decoder_run, "--empirical", "--draws", "20000"]) == 0
    assert "[ok] empirical step audit (causal-lm loss" in capsys.readouterr().out
    odd = _with_task(make_run(tmp_path / "odd"), "seq2seq")
    assert main(["audit", odd, "--empirical", "--draws", "2000"]) == 2
    captured = capsys.readouterr()
    assert "task='seq2seq' is not one of" in captured.err and captured.out == ""
