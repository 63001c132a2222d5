"""Where a run computes and in which precision: ``--device`` and ``--dtype``, resolved once.

The device holds the model, the adapters, Opacus' per-sample gradients and the DP-SGD noise.
Everything that leaves the model — a client's trainable state, the server's aggregate, the
client-level noise, checkpoints and adapter files — is on the CPU: those tensors are r×r-sized,
they are serialised anyway (safetensors and Flower records read CPU memory), and one place
for them keeps the server's arithmetic identical whatever device a client trained on.

The dtype applies to the frozen base model only. The trained tensors (R, the LoRA baselines'
factors, a trained head or pooler), their optimizer state and the DP noise added to them stay
in float32 (float64 next to a float64 base): a bfloat16 step of R would round away updates
its 8-bit mantissa cannot resolve, and noise drawn in bfloat16 would lie on a coarse grid
instead of being Gaussian.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedsb_dp.errors import SettingError

logger = logging.getLogger(__name__)

#: ``--device`` values besides ``cuda:<index>``.
DEVICE_NAMES = ("auto", "cpu", "cuda")

#: ``--dtype`` values: the frozen base model's parameter dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The narrowest dtype of a trained tensor, its optimizer state and its noise.
TRAINABLE_DTYPE = torch.float32


def trainable_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype to train in next to a base of ``base_dtype``: float32, or wider (float64)."""
    return torch.promote_types(base_dtype, TRAINABLE_DTYPE)

_DEVICE_FORM = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(text: str) -> None:
    """Raise :class:`SettingError` unless ``text`` has the form of a ``--device`` value.

    Only the form: whether this machine has the device is :func:`resolve_device`'s question,
    since a run configured on one machine may train on another's GPU.
    """
    if not isinstance(text, str) or not _DEVICE_FORM.match(text):
        raise SettingError("device", text, "must be auto, cpu, cuda or cuda:<index>")


def available_devices() -> list[str]:
    """The devices this process can use, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def resolve_device(text: str) -> torch.device:
    """The ``torch.device`` of a ``--device`` value on this machine.

    Args:
        text: ``"auto"`` (the first CUDA GPU when there is one, else the CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:<index>"``.

    Returns:
        The device; ``"cuda"`` becomes ``cuda:<current device>``.

    Raises:
        SettingError: For another form, or a CUDA device this machine does not have (the
            message lists the devices it does have).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')

    """
    check_device_name(text)
    available = available_devices()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if len(available) > 1 else (
            torch.device("cpu"))
    if text == "cpu":
        return torch.device("cpu")
    if len(available) == 1:
        raise SettingError("device", text, "needs a CUDA GPU, and torch finds none on this "
                           "machine (available: cpu); use cpu or auto")
    device = torch.device(text)
    index = torch.cuda.current_device() if device.index is None else device.index
    if f"cuda:{index}" not in available:
        raise SettingError("device", text, f"is not on this machine (available: "
                           f"{', '.join(available)})")
    return torch.device("cuda", index)


def resolve_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a ``--dtype`` value.

    Raises:
        SettingError: For a name not in :data:`DTYPES`.

    """
    if name not in DTYPES:
        raise SettingError("dtype", name, f"is not one of {tuple(DTYPES)}")
    return DTYPES[name]


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with every tensor on ``device`` (other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _inputs_to(dtype: torch.dtype):
    def cast(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def one(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(dtype)
            return value
        return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}
    return cast


def train_in_float32(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """Keep the trained modules of a reduced-precision model in float32 (or wider).

    Each module of ``modules`` whose parameters are not float32 (a classification head or
    pooler loaded with a bfloat16 base) is cast to float32 and reads its floating-point
    inputs in float32 through a forward pre-hook; its output stays float32, so the loss is
    computed in float32 too. Adapter layers need none of this: they keep their own factors
    in float32 and cast at their boundary. A float32 model is left untouched.

    Args:
        model: The model (only used in the log line).
        modules: Name → module whose parameters train.

    Returns:
        The names of the modules that were cast.

    """
    cast = []
    for name, module in modules.items():
        if all(trainable_dtype(p.dtype) == p.dtype for p in module.parameters()):
            continue  # float32 or wider already
        module.to(TRAINABLE_DTYPE)
        module.register_forward_pre_hook(_inputs_to(TRAINABLE_DTYPE), with_kwargs=True)
        cast.append(name)
    if cast:
        logger.debug("%s: trained modules %s kept in float32", type(model).__name__, cast)
    return cast
