"""What the server checks and measures of a client's reply (the mean lives in ``methods``).

Σ pᵢ·B Rᵢ A = B (Σ pᵢ Rᵢ) A for any convex weights, so averaging R is exact whenever all
clients hold bit-identical B and A, which is checked on every reply.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import save

from fedsb_dp.errors import AdapterMismatchError, ConfigError
from fedsb_dp.federated.client import ClientUpdate, NonFiniteUpdateError


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Serialised size in bytes of a tensor payload (safetensors, as it would travel)."""
    if not tensors:
        return 0
    return len(save({k: v.detach().contiguous() for k, v in tensors.items()}))


def validate_update(
    update: ClientUpdate,
    *,
    global_state: Mapping[str, torch.Tensor],
    fingerprint: str,
    expected_steps: int,
    finite_required: bool = True,
) -> None:
    """Reject a reply whose keys, shapes, dtypes, values, factors or step count are wrong.

    Args:
        update: The client's reply.
        global_state: The state the client started from (keys, shapes, dtypes).
        fingerprint: The agreed frozen factors' fingerprint.
        expected_steps: Local steps the plan asked for.
        finite_required: Refuse NaN/inf values. Pass ``False`` when the update is not yet a
            release (client-level DP: the server clips and noises it, and a non-finite update
            then contributes zero), so no client's data can stop the run.

    Raises:
        AdapterMismatchError: The client trained against other frozen factors.
        ConfigError: Malformed state or an unexpected number of steps.
        NonFiniteUpdateError: A NaN/inf value while ``finite_required``.

    """
    if update.fingerprint != fingerprint:
        raise AdapterMismatchError(
            f"client {update.client_id!r} holds frozen factors {update.fingerprint[:16]}…, "
            f"the federation agreed on {fingerprint[:16]}…"
        )
    if set(update.state) != set(global_state):
        missing = sorted(set(global_state) - set(update.state))[:3]
        extra = sorted(set(update.state) - set(global_state))[:3]
        raise ConfigError(
            f"client {update.client_id!r} sent keys missing {missing}, unexpected {extra}"
        )
    for name, tensor in update.state.items():
        reference = global_state[name]
        if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
            raise ConfigError(
                f"client {update.client_id!r}: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(reference.shape)} {reference.dtype}"
            )
        if finite_required and not torch.isfinite(tensor).all():
            raise NonFiniteUpdateError(f"client {update.client_id!r}: {name} has non-finite "
                                       "values")
    if update.steps != expected_steps:
        raise ConfigError(
            f"client {update.client_id!r} ran {update.steps} steps, the plan has {expected_steps}"
        )
