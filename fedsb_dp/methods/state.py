"""Saving and restoring a method's adapter tensors (init adapters, checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsb_dp.adapters.export import head_modules
from fedsb_dp.adapters.lora import lora_layers
from fedsb_dp.errors import AdapterMismatchError

BASE_SUFFIX = ".base_layer.weight"


def lora_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA factor (trained or frozen) and every head tensor: the whole adapter."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    for name, module in head_modules(model).items():
        for pname, p in module.named_parameters():
            tensors[f"{name}.{pname}"] = p.detach()
    # CPU copies: these are written to safetensors and sent in messages.
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}


def adapted_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights of the LoRA layers (changed by FedEx-LoRA's residual and FLoRA's merge)."""
    return {f"{name}{BASE_SUFFIX}": layer.base_layer.weight.detach().to("cpu").contiguous()
            for name, layer in lora_layers(model).items()}


@torch.no_grad()
def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy named tensors into the model's parameters, all or nothing.

    Raises:
        AdapterMismatchError: A name the model lacks, or a shape that differs.
    """
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key not in params or params[key].shape != value.shape:
            found = tuple(params[key].shape) if key in params else "missing"
            raise AdapterMismatchError(f"saved tensor {key} {tuple(value.shape)} does not fit the "
                                       f"model ({found})")
    for key, value in tensors.items():
        params[key].copy_(value)
