"""Causal-LM task: exact per-sample gradients of R, a response-only loss, and federated runs
with a tiny randomly initialised decoder (Llama- and Gemma-3-style, built from a config)."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from tiny_decoder import save_tiny_decoder, tiny_decoder, tokenizer

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.setup import inject, make_method
from fedsb_dp.tasks import CausalLMTask
from fedsb_dp.tasks.causal_lm import IGNORE_INDEX

FRAME = pd.DataFrame({
    "text": ["a great film", "awful, just awful and far too long for what it is", "meh",
             "the cast carries a thin script"],
    "label": [1, 0, 1, 0]})
LABEL_TASK = CausalLMTask("label", label_names=("rotten", "fresh"),
                          prompt_template="Review: {text}\nSentiment:")


def _adapted(kind: str, padding_side: str, *, method: str = "fedsb"):
    """A float64 tiny decoder with the method's adapters, its tokenizer, and four examples."""
    tok = tokenizer(padding_side)
    model = tiny_decoder(kind, tok).double()
    config = RunConfig(task="causal-lm", no_dp=True, rank=2, method=method,
                       init="random-orthonormal")
    inject(config, make_method(config), model, init_seed=3)
    if method == "fedsb":  # R starts near zero; move it so every term of the gradient counts
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(
                        p.numel()), dtype=p.dtype))
    model.train()
    dataset = LABEL_TASK.dataset(FRAME, tok, max_length=24)
    return model, tok, dataset


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_per_sample_gradients_of_r_equal_per_example_autograd(kind, padding_side):
    model, tok, dataset = _adapted(kind, padding_side)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dim() == 2 and p.shape[0] == p.shape[1] == 2 for p in params)
    collate = LABEL_TASK.collate(tok)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    LABEL_TASK.example_losses(wrapped, batch).mean().backward()
    per_sample = [p.grad_sample.clone() for p in params]
    wrapped._close()
    for i in range(len(dataset)):
        # Each example alone, unpadded: plain autograd.
        alone = LABEL_TASK.example_losses(model, collate([dataset[i]]))
        grads = torch.autograd.grad(alone.sum(), params)
        for sample, grad in zip(per_sample, grads, strict=True):
            torch.testing.assert_close(sample[i], grad, rtol=1e-9, atol=1e-12)


def _reference_losses(model, batch, starts):
    """Per-example mean next-token loss over response tokens, from the full-vocabulary logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    out = []
    for i, start in enumerate(starts):
        real = batch["attention_mask"][i].nonzero().flatten()
        positions = real[start:]  # response positions, in padded coordinates
        token = F.cross_entropy(logits[i, positions - 1], batch["input_ids"][i, positions],
                                reduction="none")
        out.append(token.mean())
    return torch.stack(out)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_loss_covers_response_tokens_only_and_ignores_padding(padding_side):
    model, tok, dataset = _adapted("llama", padding_side)
    collate = LABEL_TASK.collate(tok)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = collate(examples)
    for i, example in enumerate(examples):  # targets are exactly the response (+ eos) tokens
        targets = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert targets == example["input_ids"][example["response_start"]:]
    seen = []
    head = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        losses = LABEL_TASK.example_losses(model, batch)
        reference = _reference_losses(model, batch, [e["response_start"] for e in examples])
        alone = torch.cat([LABEL_TASK.example_losses(model, collate([e])) for e in examples])
    head.remove()
    torch.testing.assert_close(losses, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, alone, rtol=1e-10, atol=1e-12)  # padding changes nothing
    # The LM head saw the batch's target positions only, never the whole sequence.
    assert seen[0] == int((batch["labels"] != IGNORE_INDEX).sum())
    # A different prompt token as target changes nothing; a different response token does.
    changed = {k: v.clone() for k, v in batch.items()}
    prompt_pos = (batch["attention_mask"][0].nonzero().flatten()[2])
    changed["labels"][0, prompt_pos] = IGNORE_INDEX
    with torch.no_grad():
        assert torch.equal(LABEL_TASK.example_losses(model, changed), losses)
        response = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten()[0]
        changed["labels"][0, response] = (batch["labels"][0, response] + 1) % len(tok)
        after = LABEL_TASK.example_losses(model, changed)
    assert after[0] != losses[0] and torch.equal(after[1:], losses[1:])


def test_prompt_is_cut_from_its_start_and_the_response_kept():
    tok = tokenizer()
    task = CausalLMTask("prompt-response")
    frame = pd.DataFrame({"text": ["one two three four five six seven"], "text_pair": ["yes"],
                          "label": [0]})
    example = task.dataset(frame, tok, max_length=6)[0]
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["[CLS]", "five", "six", "seven", "yes", "[SEP]"]
    assert example["response_start"] == 4


def test_bad_task_settings_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="prompt_column.*needs task='causal-lm'"):
        RunConfig(epsilon=3, prompt_column="q", response_column="a")
    with pytest.raises(ConfigError, match="prompt_column.*needs --response-column"):
        RunConfig(epsilon=3, task="causal-lm", prompt_column="q")
    with pytest.raises(ConfigError, match="task='llm' is not one of"):
        RunConfig(epsilon=3, task="llm")
    with pytest.raises(ConfigError, match="init_source='public'"):
        RunConfig(epsilon=3, task="causal-lm", init="gradient-svd", init_source="public",
                  init_data="x.csv")


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return save_tiny_decoder(str(tmp_path_factory.mktemp("tiny-llama")))


TINY_LM = dict(task="causal-lm", max_train_records=48, max_eval_records=8, clients=2, rounds=2,
               local_steps=2, batch_size=6, max_length=32, rank=4, seed=7, epsilon=3.0,
               accountant="rdp", init="random-orthonormal", learning_rate=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"method": "ffa-lora"},
                                       {"dp_level": "client", "epsilon": 10.0}],
                         ids=["fedsb", "ffa-lora", "fedsb-client-level"])
def test_federated_dp_run_with_a_decoder_on_the_label_task(tmp_path, decoder_dir, overrides):
    config = RunConfig(**{**TINY_LM, "model": decoder_dir, **overrides,
                          "out": str(tmp_path / "run")})
    result = run_federation(config, progress=False)
    summary = result.summary
    assert result.status == "completed" and summary["task"] == "causal-lm"
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_examples"] == 8
    assert math.isclose(summary["test_perplexity"], math.exp(summary["test_loss"]))
    assert summary["label_names"] == ["rotten", "fresh"] and "test_macro_f1" not in summary
    rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert len(rows) == 2 and all(r["validation_loss"] > 0 and r["validation_perplexity"] > 1
                                  and r["validation_accuracy"] is not None for r in rows)
    assert rows[-1]["epsilon"] == summary["privacy"]["epsilon"] <= config.epsilon
    ledger = json.loads(open(os.path.join(result.run_dir, "ledger.json")).read())
    entries = ledger["body"]["entries"]
    # Honest ledger: every step run (or, client-level, every round) charged at the planned σ.
    expected = (config.rounds if config.dp_level == "client"
                else config.rounds * config.clients * config.local_steps)
    assert sum(e["count"] for e in entries) == expected
    if config.dp_level == "example":
        assert {(e["event"]["sampling_probability"], e["event"]["event"]["noise_multiplier"])
                for e in entries} == {(config.batch_size / 24, summary["noise_multiplier"])}


@pytest.mark.slow
def test_prompt_response_columns_and_a_single_text_column(tmp_path, decoder_dir):
    rows = [{"q": f"question {i} about item {i % 7}", "a": f"answer {i % 3}"} for i in range(60)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    common = {**TINY_LM, "model": decoder_dir, "dataset": str(path), "rounds": 1,
              "local_steps": 1, "no_dp": True, "epsilon": None}
    paired = run_federation(RunConfig(**common, prompt_column="q", response_column="a",
                                      out=str(tmp_path / "paired")), progress=False)
    plain = run_federation(RunConfig(**common, response_column="q",
                                     out=str(tmp_path / "plain")), progress=False)
    for summary in (paired.summary, plain.summary):
        assert summary["status"] == "completed" and summary["label_names"] == []
        assert "test_accuracy" not in summary and summary["test_perplexity"] > 1
