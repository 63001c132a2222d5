"""Causal language modelling on prompt → response pairs, with the loss on response tokens only.

Records are standardised frames (see :mod:`fedsb_dp.data`) read in one of three formats:

* ``"label"`` — a classification dataset cast as text: the prompt is a template around the
  text (``Review: {text}`` then ``Sentiment:`` on a new line, for Rotten Tomatoes) and the
  response is the label's name (``" fresh"``); exact-match of greedy generation is then an
  accuracy comparable with a classifier's.
* ``"prompt-response"`` — ``text`` is the prompt, ``text_pair`` the response.
* ``"text"`` — ``text`` is the whole response (empty prompt): plain language modelling.

An example is ``[bos] prompt response [eos]``; only response tokens (and the closing eos) are
targets. Each example's loss is the mean over *its own* target tokens, so it depends on that
example alone and Opacus' per-sample gradients are the examples' own gradients. Position ids
follow the attention mask, so left and right padding give the same losses.

Memory: the hidden states at target positions are gathered *before* the LM head, so the head
(262k outputs for Gemma 3) runs on the response tokens of the batch, not on every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fedsb_dp.devices import device_of, to_device
from fedsb_dp.errors import ConfigError, DataError
from fedsb_dp.models import CAUSAL_LM
from fedsb_dp.tasks.base import Task

#: How records become prompt/response pairs (see the module docstring).
LM_FORMATS: tuple[str, ...] = ("label", "prompt-response", "text")
#: Label ignored by the loss (the convention of ``transformers``).
IGNORE_INDEX = -100
#: Prompt of a label task, by dataset; other datasets use :data:`DEFAULT_LABEL_PROMPT`.
LABEL_PROMPTS: dict[str, str] = {"rotten-tomatoes": "Review: {text}\nSentiment:"}
DEFAULT_LABEL_PROMPT = "Text: {text}\nLabel:"


def label_prompt(dataset: str) -> str:
    """The prompt template of a label task on ``dataset`` (``{text}`` marks the record)."""
    return LABEL_PROMPTS.get(dataset, DEFAULT_LABEL_PROMPT)


class PromptResponseDataset(torch.utils.data.Dataset):
    """Tokenised ``[bos] prompt response [eos]`` sequences and where each response starts.

    A sequence longer than ``max_length`` loses the start of its prompt first (the text next
    to the response matters most for predicting it), then the end of its response.

    Args:
        prompts: Prompt texts (may be empty).
        responses: Response texts.
        tokenizer: A ``transformers`` tokenizer; its ``bos``/``eos`` tokens are added when set.
        max_length: Tokens per sequence (≥ 2).
    """

    def __init__(self, prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, *,
                 max_length: int) -> None:
        if max_length < 2:
            raise DataError(f"max_length={max_length} must be ≥ 2")
        if len(prompts) != len(responses):
            raise DataError(f"{len(prompts)} prompts for {len(responses)} responses")
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        head = [bos] if bos is not None else []
        tail = [eos] if eos is not None else []
        prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        self.examples: list[dict[str, Any]] = []
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            response = (response + tail)[:max(1, max_length - len(head))]
            room = max(0, max_length - len(head) - len(response))
            prompt = prompt[max(0, len(prompt) - room):] if room else []
            ids = head + prompt + response
            self.examples.append({"input_ids": ids, "response_start": len(ids) - len(response)})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def make_lm_collate(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pad examples on the tokenizer's ``padding_side``; build targets and position ids.

    ``labels[i, t]`` is the token at position t when it is a response token that a previous
    real token predicts, else :data:`IGNORE_INDEX` (prompt, padding, and the first real token).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [],
                                            "position_ids": [], "labels": []}
        for example in examples:
            ids, start = example["input_ids"], max(example["response_start"], 1)
            n, fill = len(ids), longest - len(example["input_ids"])
            labels = [IGNORE_INDEX] * start + ids[start:]
            parts = {"input_ids": (ids, [pad] * fill), "attention_mask": ([1] * n, [0] * fill),
                     "position_ids": (list(range(n)), [0] * fill),
                     "labels": (labels, [IGNORE_INDEX] * fill)}
            for key, (real, padding) in parts.items():
                rows[key].append(padding + real if left else real + padding)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in rows.items()}

    return collate


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 or wider: a half-precision softmax over a large vocabulary is coarse."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """The decoder stack, the LM head and the final-logit soft cap of a causal LM."""
    core = getattr(model, "_module", model)  # Opacus' GradSampleModule keeps its hooks inside
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    if decoder is None or head is None:
        raise ConfigError(f"{type(core).__name__} is not a causal LM with a decoder and an LM "
                          "head; load it with task='causal-lm'")
    return decoder, head, getattr(core.config, "final_logit_softcapping", None)


def response_token_losses(model: nn.Module, batch: dict[str, torch.Tensor],
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target token, and the example each belongs to.

    Only the hidden states that predict a target reach the LM head.

    Returns:
        ``(losses, rows)``: losses of the batch's target tokens (float32 or wider) and the
        index of the example each belongs to.
    """
    decoder, head, softcap = _decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = _widened(head(hidden[:, :-1][rows, columns]))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[rows, columns], reduction="none"), rows


def response_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean cross-entropy over its own response tokens, shape (batch,).

    The divisor is the example's own target count, never the batch's: a batch-wide divisor
    would make one example's loss depend on the others'.
    """
    losses, rows = response_token_losses(model, batch)
    size = batch["input_ids"].shape[0]
    sums = torch.zeros(size, dtype=losses.dtype, device=losses.device).index_add(0, rows, losses)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    return sums / counts.clamp_min(1).to(sums.dtype)


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: list[list[int]], *, steps: int,
                         pad_token_id: int) -> torch.Tensor:
    """``steps`` greedily generated tokens after each prompt (left-padded batch), no sampling.

    ``pad_token_id`` only fills masked positions, so any valid id will do.

    Without a key/value cache: label responses are a few tokens, and the LM head runs on the
    last position only.
    """
    decoder, head, softcap = _decoder_and_head(model)
    device = device_of(model)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (longest - len(p)) + p for p in prompts],
                       device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts],
                        device=device)
    generated = []
    for _ in range(steps):
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        hidden = decoder(input_ids=ids, attention_mask=mask,
                         position_ids=positions).last_hidden_state[:, -1]
        logits = _widened(head(hidden))
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token = logits.argmax(dim=-1, keepdim=True)
        generated.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(generated, dim=1).cpu()


class CausalLMTask(Task):
    """Fine-tuning a decoder LM on prompt → response pairs.

    Args:
        format: One of :data:`LM_FORMATS`.
        label_names: Label names of a ``"label"`` task (the responses), else empty.
        prompt_template: Template of a ``"label"`` task's prompt, with ``{text}``.
    """

    name = CAUSAL_LM

    def __init__(self, format: str, *, label_names: tuple[str, ...] = (),  # noqa: A002
                 prompt_template: str = DEFAULT_LABEL_PROMPT) -> None:
        if format not in LM_FORMATS:
            raise ConfigError(f"format={format!r} is not one of {LM_FORMATS}")
        if format == "label" and len(label_names) < 2:
            raise ConfigError(f"a label task needs ≥ 2 label names, got {list(label_names)}")
        if format == "label" and "{text}" not in prompt_template:
            raise ConfigError(f"prompt_template={prompt_template!r} must contain '{{text}}'")
        self.format = format
        self.label_names = tuple(label_names) if format == "label" else ()
        self.prompt_template = prompt_template

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Response loss and perplexity; exact-match ``accuracy`` for a label task."""
        return ("accuracy", "loss", "perplexity") if self.label_names else ("loss",
                                                                            "perplexity")

    def pairs(self, frame: pd.DataFrame) -> tuple[list[str], list[str]]:
        """The (prompts, responses) of standardised records."""
        text = frame["text"].astype(str)
        if self.format == "text":
            return [""] * len(frame), text.tolist()
        if self.format == "prompt-response":
            return text.tolist(), frame["text_pair"].astype(str).tolist()
        if "text_pair" in frame.columns:
            text = text + "\n" + frame["text_pair"].astype(str)
        prompts = [self.prompt_template.replace("{text}", t) for t in text]
        return prompts, [" " + self.label_names[int(i)] for i in frame["label"]]

    def dataset(self, frame: pd.DataFrame, tokenizer: Any, *,
                max_length: int) -> PromptResponseDataset:
        """Tokenised prompt/response sequences."""
        prompts, responses = self.pairs(frame)
        return PromptResponseDataset(prompts, responses, tokenizer, max_length=max_length)

    def collate(self, tokenizer: Any) -> Callable:
        """See :func:`make_lm_collate`."""
        return make_lm_collate(tokenizer)

    def example_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """See :func:`response_losses`."""
        return response_losses(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: torch.utils.data.Dataset,
                 collate: Callable, *, batch_size: int = 64) -> dict[str, Any]:
        """Token-mean response loss, its perplexity, and exact-match of greedy generation.

        Exact match (label tasks): the first ``len(response)`` greedy tokens after the prompt
        equal the response's tokens, its eos included, so a longer answer does not count.
        """
        was_training = model.training
        model.eval()
        total, tokens, correct = 0.0, 0, 0
        try:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                                 collate_fn=collate)
            device = device_of(model)
            for batch in loader:
                losses, _ = response_token_losses(model, to_device(batch, device))
                total += losses.double().sum().item()
                tokens += losses.numel()
            if self.label_names:
                for begin in range(0, len(dataset), batch_size):
                    chunk = [dataset[i] for i in range(begin, min(begin + batch_size,
                                                                  len(dataset)))]
                    prompts = [e["input_ids"][:e["response_start"]] for e in chunk]
                    answers = [e["input_ids"][e["response_start"]:] for e in chunk]
                    out = greedy_continuations(model, prompts, pad_token_id=0,
                                               steps=max(len(a) for a in answers))
                    correct += sum(out[i, :len(a)].tolist() == a for i, a in enumerate(answers))
        finally:
            model.train(was_training)
        loss = total / max(tokens, 1)
        result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                                  "examples": len(dataset)}
        if self.label_names:
            result["accuracy"] = correct / len(dataset)
        return result
