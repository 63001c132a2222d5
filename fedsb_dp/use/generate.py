r"""Text generation with a run's trained causal LM: greedy by default, sampling on request.

Prompts are used as given (after the tokenizer's bos token, as in training), unless the
caller asks for the run's prompt template: a label task trained on
``"Review: {text}\nSentiment:"`` (Rotten Tomatoes) answers a bare review better inside it.
Only label tasks have a template; prompt-response and plain-text runs read raw prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fedsb_dp.errors import ConfigError
from fedsb_dp.models import CAUSAL_LM

if TYPE_CHECKING:
    from fedsb_dp.models import LoadedModel
    from fedsb_dp.runs import Run

#: Upper bound of ``max_new_tokens`` (a guard against typos, not a model limit).
MAX_NEW_TOKENS = 4096


def check_generation(run: Run, prompts: Sequence[str], *, max_new_tokens: int,
                     template: bool, temperature: float) -> None:
    """Refuse bad requests before the model is loaded.

    Raises:
        ConfigError: A classifier run, no prompts, ``max_new_tokens`` outside
            1..:data:`MAX_NEW_TOKENS`, a negative temperature, or a template asked of a run
            that has none.
    """
    if run.config.task != CAUSAL_LM:
        raise ConfigError(f"{run.path!r} is a classifier run: generate needs a causal-LM run "
                          "(--task causal-lm); classify texts with `fedsb-dp predict` instead")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("give at least one prompt (--prompt TEXT), every one a string")
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
            or not 1 <= max_new_tokens <= MAX_NEW_TOKENS):
        raise ConfigError(f"--max-new-tokens {max_new_tokens!r} must be an integer in "
                          f"1..{MAX_NEW_TOKENS}")
    if not temperature >= 0:
        raise ConfigError(f"--temperature {temperature!r} must be ≥ 0 (0: greedy)")
    if template and run.config.lm_format != "label":
        raise ConfigError(f"--template: {run.path!r} trained on {run.config.lm_format} "
                          "records, which have no prompt template; give the prompt as is")


def prompt_texts(run: Run, prompts: Sequence[str], template: bool) -> list[str]:
    """The prompts, inside the run's label-task template when ``template`` is set."""
    if not template:
        return list(prompts)
    from fedsb_dp.tasks import label_prompt

    form = label_prompt(run.config.dataset)
    return [form.replace("{text}", p) for p in prompts]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids as training built them: the bos token (if any), then the prompt's tokens."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [head + ids for ids in tokenizer(list(prompts),
                                            add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                 temperature: float = 0.0, seed: int | None = None) -> list[list[int]]:
    """The new token ids after each prompt (up to and excluding the eos token).

    Args:
        model: A causal LM (``transformers`` or ``peft``), in eval mode.
        tokenizer: Its tokenizer.
        prompts: Prompt texts (already templated if wanted).
        max_new_tokens: Tokens to generate at most.
        temperature: 0 for greedy decoding; > 0 samples at that temperature.
        seed: Seed of the sampling (ignored when greedy). The caller's global RNG state is
            restored afterwards.
    """
    from fedsb_dp.devices import device_of

    encoded = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(ids) for ids in encoded)
    device = device_of(model)
    # Left padding, so every row's next token follows its own last prompt token.
    ids = torch.tensor([[pad] * (longest - len(x)) + x for x in encoded], device=device)
    mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in encoded],
                        device=device)
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=pad,
                   eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, **options)
    else:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             temperature=None, top_k=None, top_p=None, **options)
    result = []
    for row in out[:, longest:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]  # what follows is padding
        result.append(row)
    return result


def generate_texts(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 32,
                   temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """The decoded continuation of each prompt (special tokens dropped)."""
    rows = generate_ids(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed)
    return [loaded.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
