"""Flower run config (flat ``key = value`` pairs) ↔ :class:`RunConfig` (no ``flwr`` import).

Every :class:`RunConfig` setting is a run-config key: its name with ``-`` for ``_``
(``local-steps``), generated from the same settings as the ``fedsb-dp run`` flags. Flower
values cannot be ``None``, so an empty string stands for "unset" in optional settings
(``seed = ""`` is an OS-entropy run); lists (``targets``, ``client-ranks``) are
comma-separated strings. Keys that only the Flower server reads are in :class:`FlowerOptions`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedsb_dp.errors import ConfigError, SettingError
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.settings import parse_text, settings_of


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


def run_values(user_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run settings (by field name) and the Flower options in a Flower run config.

    Raises:
        ConfigError: For unknown keys, or a value of the wrong type (named by its key).

    """
    option_names = {_flower_key(f.name): f.name for f in fields(FlowerOptions)}
    run_items = {item.key: item for item in settings_of(RunConfig)}
    unknown = sorted(set(user_config) - set(option_names) - set(run_items))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known: "
                          f"{sorted(set(option_names) | set(run_items))}")
    options = {option_names[k]: v for k, v in user_config.items() if k in option_names}
    values: dict[str, Any] = {}
    for key, value in user_config.items():
        item = run_items.get(key)
        if item is None:
            continue
        # Strings stand for what Flower's config values cannot hold: unset, lists.
        if isinstance(value, str) and (item.kind.many or item.kind.base is not str or (
                item.kind.optional and value == "")):
            value = parse_text(item, value, shown=key)
        if value is not None:
            values[item.name] = value
    return values, options


def from_flower(user_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Build the run's settings from a Flower run config.

    Args:
        user_config: ``context.run_config`` (keys as in ``[tool.flwr.app.config]``).

    Returns:
        The :class:`RunConfig` and the Flower-only options.

    Raises:
        ConfigError: For unknown keys or invalid values (named by their run-config key, with
            the valid range).

    """
    values, options = run_values(user_config)
    if values.get("no_dp"):
        values.pop("epsilon", None)  # the pyproject default ε would contradict --no-dp
    try:
        config = RunConfig.from_dict(values)
    except SettingError as exc:
        raise SettingError(_flower_key(exc.setting), exc.value, exc.requirement) from None
    return config, FlowerOptions(**options)


def to_flower(config: RunConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """The Flower run config that :func:`from_flower` maps back to ``config``."""
    out: dict[str, Any] = {}
    for item in settings_of(RunConfig):
        value = getattr(config, item.name)
        if value is None:
            value = ""
        elif item.kind.many:
            value = ",".join(str(v) for v in value)
        out[item.key] = value
    for f in fields(FlowerOptions):
        out[_flower_key(f.name)] = getattr(options or FlowerOptions(), f.name)
    return out
