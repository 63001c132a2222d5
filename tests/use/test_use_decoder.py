"""Using a finished decoder run: PEFT/merged/sb export, generation, the refusals.

A tiny random decoder over the offline MiniLM vocabulary keeps these fast; the real runs
(Opacus, accountant, ledger) are the same code as for Gemma (see ``test_use_gemma``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from readme_blocks import commands, run_python
from tiny_decoder import save_tiny_decoder

import fedsb_dp
from fedsb_dp.cli import main
from fedsb_dp.errors import ConfigError
from fedsb_dp.use.export import load_sb_export
from fedsb_dp.use.generate import encode_prompts

RUN = dict(task="causal-lm", max_train_records=24, max_eval_records=4, clients=2, rounds=1,
           local_steps=1, batch_size=4, max_length=24, rank=4, seed=7, epsilon=3.0,
           accountant="rdp", init="random-orthonormal", learning_rate=0.5)
PROMPTS = ["a gripping and moving film", "dull"]


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return save_tiny_decoder(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def label_run(decoder_dir, tmp_path_factory):
    """Fed-SB on the Rotten Tomatoes label task ("Review: …\\nSentiment:" → label name)."""
    out = tmp_path_factory.mktemp("use") / "label"
    return fedsb_dp.run(model=decoder_dir, out=str(out), **RUN)


@pytest.fixture(scope="module")
def fedex_run(decoder_dir, tmp_path_factory, rotten_tomatoes):
    """FedEx-LoRA on free-form text: its residual is folded into the base weights."""
    out = tmp_path_factory.mktemp("use") / "fedex"
    return fedsb_dp.run(model=decoder_dir, out=str(out), method="fedex-lora",
                        response_column="text", **RUN)


def _ids(tokenizer, prompts):
    encoded = encode_prompts(tokenizer, prompts)
    longest = max(map(len, encoded))
    ids = torch.tensor([[0] * (longest - len(x)) + x for x in encoded])
    mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in encoded])
    return ids, mask


def _greedy(model, tokenizer, prompts, steps=6):
    ids, mask = _ids(tokenizer, prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _logits(model, tokenizer, prompts):
    ids, mask = _ids(tokenizer, prompts)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_peft_and_merged_exports_generate_the_runs_tokens(label_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    own = label_run.load_model()
    base = own.resolved_path
    assert main(["export", label_run.path, "--format", "peft", "--out",
                 str(tmp_path / "peft")]) == 0
    assert main(["export", label_run.path, "--format", "merged", "--out",
                 str(tmp_path / "merged")]) == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     str(tmp_path / "peft")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "peft"))
    prompts = [f"Review: {p}\nSentiment:" for p in PROMPTS]
    expected = _logits(own.model, own.tokenizer, prompts)
    # The adapter is not a no-op: the trained model differs from its base.
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    assert (_logits(plain, tokenizer, prompts) - expected).abs().max() > 1e-3
    for model in (peft, merged):
        torch.testing.assert_close(_logits(model, tokenizer, prompts), expected,
                                   atol=1e-5, rtol=1e-5)
        assert _greedy(model, tokenizer, prompts).equal(
            _greedy(own.model, own.tokenizer, prompts))
    record = json.loads((tmp_path / "peft" / "export.json").read_text())
    assert record["epsilon"] == label_run.epsilon() and 0 < record["epsilon"] <= 3.0
    assert record["delta"] == label_run.privacy().delta < 1 / 24
    assert (record["method"], record["format"], record["base_model_path"]) == (
        "fedsb", "peft", base)


def test_generate_cli_and_python_agree_with_peft(label_run, tmp_path, capsys):

    from fedsb_dp.use.generate import generate_ids, generate_texts

    texts = label_run.generate(PROMPTS, max_new_tokens=5, template=True)
    capsys.readouterr()
    assert main(["generate", label_run.path, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--template", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"### {PROMPTS[0]}", texts[0], f"### {PROMPTS[1]}", texts[1]]
    # The README's commands and loader, as printed.
    export, generate = commands("use-decoder", {"runs/lm": label_run.path,
                                                "my-lm": str(tmp_path / "peft")})
    assert main(export) == 0
    capsys.readouterr()
    assert main(generate) == 0
    (single,) = label_run.generate("a gripping film", max_new_tokens=5, template=True)
    assert capsys.readouterr().out == single + "\n"
    own = label_run.load_model()
    loaded = run_python("use-decoder-loader", {"my-lm": str(tmp_path / "peft")})
    ours = own.model.generate(input_ids=torch.tensor([loaded["ids"]]), max_new_tokens=5,
                              do_sample=False)
    assert loaded["out"].equal(ours)
    # The same continuation from PEFT's own model (greedy, stopped at eos like ours).
    peft = loaded["model"]
    templated = [f"Review: {p}\nSentiment:" for p in PROMPTS]
    ids = generate_ids(peft, own.tokenizer, templated, max_new_tokens=5)
    assert [own.tokenizer.decode(r, skip_special_tokens=True) for r in ids] == texts
    # Sampling is repeatable by seed and leaves the caller's RNG alone.
    state = torch.random.get_rng_state()
    one = generate_texts(own, templated, max_new_tokens=5, temperature=1.5, seed=3)
    assert one == generate_texts(own, templated, max_new_tokens=5, temperature=1.5, seed=3)
    assert torch.random.get_rng_state().equal(state)


def test_fedex_lora_exports_merged_and_sb_and_refuses_peft(fedex_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    own = fedex_run.load_model()  # free-form text: no label names, still loads
    assert fedex_run.label_names == []
    # FedEx-LoRA folded its residual into the base: a plain adapter would miss it.
    base = AutoModelForCausalLM.from_pretrained(own.resolved_path)
    q = "model.layers.0.self_attn.q_proj"
    assert not own.model.get_submodule(q).base_layer.weight.equal(
        base.get_submodule(q).weight)
    assert main(["export", fedex_run.path, "--format", "peft", "--out",
                 str(tmp_path / "peft")]) == 2
    assert "cannot express a fedex-lora run" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()
    fedex_run.export(str(tmp_path / "merged"), "merged")
    fedex_run.export(str(tmp_path / "sb"), "sb")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    rebuilt = load_sb_export(str(tmp_path / "sb")).model
    expected = _logits(own.model, own.tokenizer, PROMPTS)
    for model in (merged, rebuilt):
        torch.testing.assert_close(_logits(model, own.tokenizer, PROMPTS), expected,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="no prompt template"):
        fedex_run.generate(PROMPTS, template=True)


@pytest.mark.parametrize("args, message", [
    (["export", "{run}", "--format", "merged", "--out", "{full}"], "not empty.*--force"),
    (["export", "{run}", "--format", "onnx"], "invalid choice: 'onnx'"),
    (["generate", "{run}", "--prompt", "x", "--max-new-tokens", "0"],
     "--max-new-tokens 0 must be an integer in 1..4096"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0"),
    (["generate", "{run}", "--prompt", "x", "--device", "gpu"], "device"),
    (["predict", "{run}", "--text", "x"], "causal-LM run.*fedsb-dp generate"),
])
def test_bad_requests_are_refused_with_one_line(label_run, tmp_path, capsys, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    argv = [a.format(run=label_run.path, full=full) for a in args]
    with pytest.raises(SystemExit) if "onnx" in args else _nothing():
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert (full / "keep.txt").read_text() == "precious" and os.listdir(full) == ["keep.txt"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
