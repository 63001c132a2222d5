"""Saving and exporting LoRA-SB models: safetensors state, merged models, PEFT LoRA adapters.

Nothing here pickles: tensors go to safetensors, settings to JSON.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedsb_dp.adapters.config import SBConfig
from fedsb_dp.adapters.initializers import LayerFactors
from fedsb_dp.adapters.inject import (
    frozen_fingerprint,
    inject_adapters,
    replace_submodule,
    sb_layers,
    trainable_state,
)
from fedsb_dp.errors import AdapterMismatchError, ConfigError
from fedsb_dp.models import SEQUENCE_CLASSIFICATION, find_head, find_pooler

ADAPTER_WEIGHTS = "lora_sb_adapter.safetensors"
ADAPTER_CONFIG = "lora_sb_config.json"


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    # safetensors writes CPU memory; a GPU model's tensors are copied over first.
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
              metadata=metadata)
    os.replace(tmp, path)


def save_trainable_state(model: nn.Module, path: str) -> None:
    """Write the trainable tensors (every R, and the head if it trains) to safetensors.

    The file records the frozen-factor fingerprint, so it can only be loaded into a model with
    the same B and A.
    """
    _atomic_save(trainable_state(model), path, {"frozen_fingerprint": frozen_fingerprint(model)})


def check_state_matches(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``state`` has exactly the model's trainable keys with the same shapes."""
    expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"trainable state keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise AdapterMismatchError(
                f"{name}: shape {tuple(state[name].shape)} in the state, model has {tuple(shape)}"
            )


@torch.no_grad()
def set_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable tensors after checking keys and shapes."""
    check_state_matches(model, state)
    parameters = dict(model.named_parameters())
    for name, tensor in state.items():
        parameters[name].copy_(tensor)


def load_trainable_state(model: nn.Module, path: str) -> None:
    """Load a file written by :func:`save_trainable_state`, checking fingerprint, keys, shapes."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("frozen_fingerprint")
    if recorded != frozen_fingerprint(model):
        raise AdapterMismatchError(
            f"{path} was saved for different frozen factors (fingerprint {str(recorded)[:16]}…)"
        )
    set_trainable_state(model, load_file(path))


def save_sb_adapter(model: nn.Module, directory: str, config: SBConfig, *,
                    base_model: str) -> None:
    """Save everything needed to rebuild the adapted model from its base: B, A, R, head.

    Args:
        model: The adapted model.
        directory: Created if missing.
        config: The adapter settings used.
        base_model: Name or path of the base model, recorded for loading.

    """
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in sb_layers(model).items():
        tensors[f"{name}.B"] = layer.lora_sb_B
        tensors[f"{name}.A"] = layer.lora_sb_A
        tensors[f"{name}.R"] = layer.R.weight
    for name, module in head_modules(model).items():
        for pname, p in module.named_parameters():
            tensors[f"head.{name}.{pname}"] = p
    _atomic_save(tensors, os.path.join(directory, ADAPTER_WEIGHTS),
                 {"frozen_fingerprint": frozen_fingerprint(model)})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
        json.dump({"config": config.to_dict(), "base_model": base_model,
                   "layers": sorted(sb_layers(model))}, fh, indent=2, sort_keys=True)


def load_sb_adapter(model: nn.Module, directory: str) -> SBConfig:
    """Inject and load an adapter saved by :func:`save_sb_adapter` into a fresh base model.

    Returns:
        The adapter settings.

    """
    with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as fh:
        saved = json.load(fh)
    config = SBConfig.from_dict(saved["config"])
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    factors = {}
    for name in saved["layers"]:
        try:
            factors[name] = LayerFactors(
                B=tensors[f"{name}.B"], R=tensors[f"{name}.R"], A=tensors[f"{name}.A"]
            )
        except KeyError as exc:
            raise AdapterMismatchError(f"adapter file lacks tensor {exc}") from None
    inject_adapters(model, factors, config)
    with torch.no_grad():
        for name, module in head_modules(model).items():
            for pname, p in module.named_parameters():
                key = f"head.{name}.{pname}"
                if key not in tensors or tensors[key].shape != p.shape:
                    raise AdapterMismatchError(f"adapter file lacks or misshapes {key}")
                p.copy_(tensors[key])
    return config


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Classifier and, for BERT-style models, the pooler it reads: saved with every adapter."""
    found = [find_head(model), find_pooler(model)]
    return {item[0]: item[1] for item in found if item is not None}


def unwrap_adapters(model: nn.Module, *, merge: bool) -> nn.Module:
    """Replace every :class:`SBLinear` by its base layer, merging ΔW first if asked (in place)."""
    for name, layer in sb_layers(model).items():
        if merge and not layer.merged:
            layer.merge(safe_merge=True)
        elif not merge and layer.merged:
            layer.unmerge()
        replace_submodule(model, name, layer.base_layer)
    return model


def _check_exportable(model: nn.Module) -> None:
    from fedsb_dp.models import pooling_of

    if pooling_of(model) == "mean":
        raise ConfigError(
            "this classifier reads a mean pooler, which a plain transformers or PEFT model "
            "cannot express (it would load with an untrained [CLS] pooler and predict "
            "differently); keep the saved LoRA-SB adapter, or train with pooling='cls'")


def save_merged(model: nn.Module, directory: str, tokenizer: object | None = None) -> None:
    """Save a plain ``transformers`` model with W0 + s·B R A merged (``save_pretrained``).

    The live model is left untouched: a copy is merged.

    Raises:
        ConfigError: If the classifier reads a mean pooler (not expressible as a plain
            ``transformers`` model).
    """
    _check_exportable(model)
    merged = unwrap_adapters(copy.deepcopy(model), merge=True)
    for p in merged.parameters():
        p.requires_grad_(True)
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def export_peft_adapter(
    model: nn.Module,
    directory: str,
    *,
    base_model: str,
    task: str = SEQUENCE_CLASSIFICATION,
) -> None:
    """Export as a standard PEFT LoRA adapter of rank r: lora_B = B·R, lora_A = A.

    With ``lora_alpha = s·r`` PEFT's scaling ``alpha / r`` equals s, so PEFT computes
    s·(B R)·A = ΔW exactly. A classification head (trained or not) is saved through
    ``modules_to_save`` so the loaded model has the same head.

    Args:
        model: The adapted model.
        directory: Output directory for ``PeftModel.from_pretrained``.
        base_model: Name or path recorded as the adapter's base model.
        task: ``"sequence-classification"`` or ``"causal-lm"``.

    """
    from peft import LoraConfig, TaskType, get_peft_model

    _check_exportable(model)
    layers = sb_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA-SB layers to export")
    ranks = {layer.rank for layer in layers.values()}
    scalings = {layer.scaling for layer in layers.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ConfigError(f"PEFT export needs one rank and scaling; found {ranks}, {scalings}")
    rank, scaling = ranks.pop(), scalings.pop()
    heads = head_modules(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,
        lora_dropout=0.0,
        target_modules=sorted(layers),
        modules_to_save=sorted(heads) or None,
        task_type=TaskType.SEQ_CLS if task == SEQUENCE_CLASSIFICATION else TaskType.CAUSAL_LM,
        init_lora_weights=False,
    )
    base = unwrap_adapters(copy.deepcopy(model), merge=False)
    base.config.name_or_path = base_model
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_sb_A)
            target.lora_B["default"].weight.copy_(layer.lora_sb_B @ layer.R.weight)
        for name, module in heads.items():
            wrapper = peft_model.base_model.model.get_submodule(name)
            wrapper.modules_to_save["default"].load_state_dict(module.state_dict())
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(directory)
