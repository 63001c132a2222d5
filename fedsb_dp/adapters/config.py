"""The LoRA-SB adapter configuration."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedsb_dp.errors import ConfigError

_DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Per-architecture default targets, those the LoRA-SB authors adapt: attention query/value on
# BERT-type encoders, every attention and MLP projection on decoder LLMs. Matched as whole
# dotted-name suffixes. Multimodal "gemma3" (Gemma 3 ≥ 4B) has no default on purpose: its
# vision tower also names layers q_proj/k_proj/v_proj, and a suffix cannot tell them apart from
# the language model's; text-only Gemma 3 (270M, 1B) is "gemma3_text".
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "mpnet": ("q", "v"),
    "roberta": ("query", "value", "attention.output.dense", "output.dense"),
    "xlm-roberta": ("query", "value", "attention.output.dense", "output.dense"),
    "llama": _DECODER_PROJECTIONS,
    "mistral": _DECODER_PROJECTIONS,
    "gemma": _DECODER_PROJECTIONS,
    "gemma2": _DECODER_PROJECTIONS,
    "gemma3_text": _DECODER_PROJECTIONS,
    "qwen2": _DECODER_PROJECTIONS,
    "qwen3": _DECODER_PROJECTIONS,
}


def default_targets(model_type: str) -> tuple[str, ...]:
    """Return the default target modules of an architecture.

    Raises:
        ConfigError: If the architecture has no default; pass ``target_modules`` then.

    """
    try:
        return DEFAULT_TARGETS[model_type]
    except KeyError:
        raise ConfigError(
            f"no default target modules for model_type={model_type!r}; pass target_modules "
            f"explicitly (architectures with defaults: {sorted(DEFAULT_TARGETS)})"
        ) from None


@dataclass(frozen=True)
class SBConfig:
    """Settings of LoRA-SB adapters ``W = W0 + s·B R A``.

    Attributes:
        rank: r, the side of the trained r×r matrix R (1 ≤ r ≤ min(m, n) of every target).
        target_modules: Dotted-name suffixes of the linear layers to adapt; ``None`` uses the
            architecture default (BERT: ``query``, ``value``).
        dropout: Dropout probability on the adapter input (0 disables it).
        scaling: s, the factor in front of B R A.
        train_head: Whether the task head (classifier) is trained, and so communicated and
            noised like R.
        train_pooler: Also train the pooler that a BERT-style classifier reads (part of the
            head: communicated and noised like R). Needed when the checkpoint's pooler was
            never trained for classification, as in sentence-embedding models.
    """

    rank: int = 16
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0
    scaling: float = 1.0
    train_head: bool = True
    train_pooler: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r} must be a positive integer")
        if self.target_modules is not None:
            targets = tuple(self.target_modules)
            if not targets or any(not isinstance(t, str) or not t.strip(".") for t in targets):
                raise ConfigError(
                    f"target_modules={self.target_modules!r} must be a non-empty list of names"
                )
            object.__setattr__(self, "target_modules", targets)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.scaling > 0.0:
            raise ConfigError(f"scaling={self.scaling} must be > 0")
        if self.train_pooler and not self.train_head:
            raise ConfigError("train_pooler=True needs train_head=True (the pooler is part of "
                              "the head)")

    def resolved_targets(self, model_type: str) -> tuple[str, ...]:
        """Targets to adapt for a model of ``model_type``."""
        return self.target_modules or default_targets(model_type)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary."""
        out = asdict(self)
        if self.target_modules is not None:
            out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SBConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown SBConfig keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        if values.get("target_modules") is not None:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)
