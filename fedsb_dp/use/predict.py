"""Batch classification with a run's trained model: label names and class probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fedsb_dp.errors import ConfigError
from fedsb_dp.models import CAUSAL_LM

if TYPE_CHECKING:
    import pandas as pd

    from fedsb_dp.models import LoadedModel
    from fedsb_dp.runs import Run

#: Column of the predicted label; the probabilities follow as ``p_<label name>``.
LABEL_COLUMN = "label"
SCORE_COLUMN = "probability"


def check_predictable(run: Run, texts: Sequence[str], *, batch_size: int,
                      pairs: Sequence[str] | None = None) -> None:
    """Refuse bad requests before the model is loaded.

    Refused: a causal-LM run, no texts, a bad batch size, and texts that do not match the
    run's input (a text-pair classifier needs a second text per example, and only it does).

    Raises:
        ConfigError: Naming the bad value and what is valid.
    """
    if run.config.task == CAUSAL_LM:
        raise ConfigError(f"{run.path!r} is a causal-LM run: predict classifies; continue "
                          "prompts with `fedsb-dp generate RUN --prompt TEXT` instead")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r} must be an integer ≥ 1")
    if not texts:
        raise ConfigError("no texts to classify: give --text TEXT or --input FILE")
    pair_column = run.config.text_pair_column
    if pair_column and pairs is None:
        raise ConfigError(
            f"{run.path!r} classifies text pairs ({run.config.text_column!r}, {pair_column!r}):"
            " give the second text of each example with --text-pair (once per --text), or "
            "--input FILE with both columns (--text-pair-column, default the run's)")
    if not pair_column and pairs is not None:
        raise ConfigError(f"{run.path!r} classifies single texts; --text-pair and "
                          "--text-pair-column apply to text-pair runs only")
    if pairs is not None and len(pairs) != len(texts):
        raise ConfigError(f"{len(texts)} text(s) but {len(pairs)} --text-pair value(s); give "
                          "one second text per text")
    for name, values in (("text", texts), ("text pair", pairs or [])):
        bad = [i for i, t in enumerate(values) if not isinstance(t, str)]
        if bad:
            raise ConfigError(f"{name} {bad[0]} is {values[bad[0]]!r}, not a string")


@torch.no_grad()
def predict_texts(loaded: LoadedModel, texts: Sequence[str], *, batch_size: int = 32,
                  max_length: int | None = None,
                  pairs: Sequence[str] | None = None) -> pd.DataFrame:
    """Classify ``texts`` (with their ``pairs``, for a text-pair classifier): one row each.

    Texts are encoded exactly as the run's training and evaluation did: the pair joined by the
    tokenizer, truncated to ``max_length`` tokens.

    Args:
        loaded: A classifier from :meth:`fedsb_dp.Run.load_model` (eval mode).
        texts: The texts (the first text of each pair).
        batch_size: Texts per forward pass.
        max_length: Tokens per example (default: the tokenizer's limit).
        pairs: The second text of each example, for a run trained on text pairs.

    Returns:
        Columns ``text`` (and ``text_pair``), ``label`` (the most probable class, by name),
        ``probability`` (its probability) and ``p_<name>`` for every class.
    """
    import pandas as pd

    from fedsb_dp.devices import device_of, to_device

    model, tokenizer = loaded.model, loaded.tokenizer
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    device = device_of(model)
    chunks = []
    for begin in range(0, len(texts), batch_size):
        second = None if pairs is None else list(pairs[begin:begin + batch_size])
        batch = tokenizer(list(texts[begin:begin + batch_size]), second, padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt")
        logits = model(**to_device(batch, device)).logits
        chunks.append(torch.softmax(logits.double(), dim=-1).cpu())
    probs = torch.cat(chunks).numpy()
    frame = pd.DataFrame({"text": list(texts)})
    if pairs is not None:
        frame["text_pair"] = list(pairs)
    best = probs.argmax(axis=1)
    frame[LABEL_COLUMN] = [names[i] for i in best]
    frame[SCORE_COLUMN] = probs[range(len(best)), best]
    for i, name in enumerate(names):
        frame[f"p_{name}"] = probs[:, i]
    return frame


def read_texts(path: str, column: str, *, flag: str = "--text-column") -> list[str]:
    """The ``column`` of a CSV, JSON Lines or Parquet file, as strings.

    Raises:
        ConfigError: A missing file, an unknown extension, or a missing column (the message
            lists the file's columns).
    """
    import os

    import pandas as pd

    if not os.path.isfile(path):
        raise ConfigError(f"--input {path!r} does not exist")
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        frame = pd.read_csv(path, sep="\t" if lower.endswith(".tsv") else ",")
    elif lower.endswith((".jsonl", ".json")):
        frame = pd.read_json(path, lines=lower.endswith(".jsonl"))
    elif lower.endswith(".parquet"):
        frame = pd.read_parquet(path)
    else:
        raise ConfigError(f"--input {path!r}: expected a .csv, .tsv, .jsonl, .json or "
                          ".parquet file")
    if column not in frame.columns:
        raise ConfigError(f"{flag} {column!r} is not a column of {path!r} (columns: "
                          f"{', '.join(map(str, frame.columns))})")
    return frame[column].fillna("").astype(str).tolist()
