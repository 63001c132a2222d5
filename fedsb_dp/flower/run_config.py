"""Flower run config (flat ``key = value`` pairs) ↔ :class:`RunConfig` (no ``flwr`` import).

Every :class:`RunConfig` field is a run-config key with ``-`` for ``_`` (``local-steps``);
Flower values cannot be ``None``, so an empty string stands for "unset" in optional fields
(``seed = ""`` is an OS-entropy run). ``targets`` is a comma-separated string. Keys that only
the Flower server reads are in :class:`FlowerOptions`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.run_config import RunConfig

#: Fields given as comma-separated strings in the Flower run config, and their item type.
LIST_FIELDS = {"targets": str, "client_ranks": int}


@dataclass(frozen=True)
class FlowerOptions:
    """Settings of the Flower server that are not part of the federation's definition.

    Attributes:
        round_timeout: Seconds the server waits for a round's replies; a client that has not
            answered by then is treated as dropped (and stays charged for the round).
        node_wait_timeout: Seconds the server waits for ``clients`` SuperNodes to connect.
        resume: Continue the run in ``out`` from its last completed round (the same nodes
            must connect again).

    """

    round_timeout: float = 900.0
    node_wait_timeout: float = 300.0
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("round_timeout", "node_wait_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                value > 0 and math.isfinite(value)
            ):
                raise ConfigError(f"{name}={value!r} must be a finite number of seconds > 0")


def _flower_key(name: str) -> str:
    return name.replace("_", "-")


def from_flower(user_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Build the run's settings from a Flower run config.

    Args:
        user_config: ``context.run_config`` (keys as in ``[tool.flwr.app.config]``).

    Returns:
        The :class:`RunConfig` and the Flower-only options.

    Raises:
        ConfigError: For unknown keys or invalid values (named, with the valid range).

    """
    option_names = {_flower_key(f.name): f.name for f in fields(FlowerOptions)}
    run_names = {_flower_key(f.name): f.name for f in fields(RunConfig)}
    unknown = sorted(set(user_config) - set(option_names) - set(run_names))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known: "
                          f"{sorted(set(option_names) | set(run_names))}")
    options = {option_names[k]: v for k, v in user_config.items() if k in option_names}
    optional = {f.name for f in fields(RunConfig) if f.default is None}
    values: dict[str, Any] = {}
    for key, value in user_config.items():
        if key not in run_names:
            continue
        name = run_names[key]
        if name in optional and value == "":
            continue
        if name in LIST_FIELDS:
            try:
                value = tuple(LIST_FIELDS[name](t.strip()) for t in str(value).split(",")
                              if t.strip())
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a comma-separated list of "
                                  f"{LIST_FIELDS[name].__name__}") from None
        values[name] = value
    if values.get("no_dp"):
        values.pop("epsilon", None)  # the pyproject default ε would contradict --no-dp
    return RunConfig.from_dict(values), FlowerOptions(**options)


def to_flower(config: RunConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """The Flower run config that :func:`from_flower` maps back to ``config``."""
    out: dict[str, Any] = {}
    for name, value in config.to_dict().items():
        if value is None:
            value = ""
        elif name in LIST_FIELDS:
            value = ",".join(str(v) for v in value)
        out[_flower_key(name)] = value
    for f in fields(FlowerOptions):
        out[_flower_key(f.name)] = getattr(options or FlowerOptions(), f.name)
    return out
