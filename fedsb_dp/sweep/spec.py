"""A sweep's grid: ε × method × rank × partition × seed over one base configuration.

TOML form (``fedsb-dp sweep --spec sweep.toml``)::

    epsilons = [1, 3, 8, "inf"]          # "inf" = non-private reference
    methods = ["fedsb", "ffa-lora", "fedit"]
    partitions = ["iid", "dirichlet:0.3"]
    seeds = [0, 1, 2]
    [ranks]                              # per method; "default" for the others
    fedsb = [16, 32, 64]
    default = [16, 32]
    [base]                               # any RunConfig setting shared by every cell
    max_train_records = 3000
    [method_settings.fedsb]              # per-method settings (e.g. its tuned learning rate)
    learning_rate = 1e-2
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from typing import Any

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.partition import PartitionSpec
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.methods import method_class

SWEEP_FIELDS = ("epsilons", "methods", "partitions", "seeds", "ranks", "base",
                "method_settings")
_GRID_KEYS = ("epsilon", "no_dp", "method", "rank", "partition", "seed", "out")


def _epsilon(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "∞"):
        return math.inf
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"epsilon {value!r} must be a number > 0 or 'inf'") from None
    if not eps > 0:
        raise ConfigError(f"epsilon {value!r} must be > 0 (or 'inf' for a non-private cell)")
    return eps


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    epsilon: float
    method: str
    rank: int
    partition: str
    seed: int

    @property
    def name(self) -> str:
        """Directory name, unique within the sweep and readable."""
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        return (f"eps{eps}_{self.method}_r{self.rank}_"
                f"{self.partition.replace(':', '-')}_s{self.seed}")

    def config(self, base: dict[str, Any], out: str) -> RunConfig:
        """The cell's RunConfig: base settings plus the grid point."""
        private = not math.isinf(self.epsilon)
        return RunConfig.from_dict({
            **base, "method": self.method, "rank": self.rank, "partition": self.partition,
            "seed": self.seed, "out": out, "epsilon": self.epsilon if private else None,
            "no_dp": not private})


@dataclass(frozen=True)
class SweepSpec:
    """The grid and the shared settings.

    Attributes:
        epsilons: Targets; ``math.inf`` is a non-private reference cell.
        methods: Method names (see ``fedsb_dp.methods.METHODS``).
        partitions: Partition specs.
        seeds: Seeds (≥ 3 for error bars).
        ranks: Method → ranks; key ``"default"`` for methods not listed.
        base: RunConfig settings shared by every cell (not the grid keys).
        method_settings: Method → RunConfig settings overriding ``base`` for that method's
            cells (each method at its own tuned learning rate, say).
    """

    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0, math.inf)
    methods: tuple[str, ...] = ("fedsb", "ffa-lora", "fedit", "fedex-lora", "flora")
    partitions: tuple[str, ...] = ("iid",)
    seeds: tuple[int, ...] = (0, 1, 2)
    ranks: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"default": (16,)})
    base: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilons", tuple(_epsilon(e) for e in self.epsilons))
        for name in ("methods", "partitions", "seeds"):
            values = tuple(getattr(self, name))
            if not values:
                raise ConfigError(f"sweep {name} must not be empty")
            object.__setattr__(self, name, values)
        for method in self.methods:
            method_class(method)
        for partition in self.partitions:
            PartitionSpec.parse(partition)
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"seeds={list(self.seeds)} must be integers")
        ranks = {k: tuple(v) for k, v in self.ranks.items()}
        missing = [m for m in self.methods if m not in ranks and "default" not in ranks]
        if missing:
            raise ConfigError(f"no ranks for methods {missing}: add them or a 'default' entry")
        for key, values in ranks.items():
            if not values or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                 for r in values):
                raise ConfigError(f"ranks[{key!r}]={list(values)} must be positive integers")
        object.__setattr__(self, "ranks", ranks)
        clash = sorted(set(self.base) & set(_GRID_KEYS))
        if clash:
            raise ConfigError(f"base settings {clash} are set by the grid; remove them from "
                              "[base]")
        settings = {k: dict(v) for k, v in self.method_settings.items()}
        strangers = sorted(set(settings) - set(self.methods))
        if strangers:
            raise ConfigError(f"method_settings for {strangers}, which the sweep does not run "
                              f"(methods: {list(self.methods)})")
        for method, values in settings.items():
            clash = sorted(set(values) & set(_GRID_KEYS))
            if clash:
                raise ConfigError(f"method_settings.{method} {clash} are set by the grid")
        object.__setattr__(self, "method_settings", settings)
        for method in self.methods:  # validates every base and per-method setting
            cell = next(c for c in self.cells() if c.method == method)
            cell.config(self.settings_of(method), out="/nonexistent")

    def settings_of(self, method: str) -> dict[str, Any]:
        """The RunConfig settings of ``method``'s cells: ``base`` then its own overrides."""
        return {**self.base, **self.method_settings.get(method, {})}

    def ranks_of(self, method: str) -> tuple[int, ...]:
        """Ranks swept for ``method``."""
        return self.ranks.get(method, self.ranks.get("default", ()))

    def cells(self) -> list[Cell]:
        """Every grid point, in a stable order (cheap ε first)."""
        return [Cell(eps, method, rank, partition, seed)
                for eps in self.epsilons for partition in self.partitions
                for method in self.methods for rank in self.ranks_of(method)
                for seed in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (ε = ∞ as ``"inf"``)."""
        return {"epsilons": ["inf" if math.isinf(e) else e for e in self.epsilons],
                "methods": list(self.methods), "partitions": list(self.partitions),
                "seeds": list(self.seeds), "ranks": {k: list(v) for k, v in self.ranks.items()},
                "base": dict(self.base),
                # only when used, so the digests of sweeps written before it existed still match
                **({"method_settings": {k: dict(v) for k, v in self.method_settings.items()}}
                   if self.method_settings else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(data) - set(SWEEP_FIELDS))
        if unknown:
            raise ConfigError(f"unknown sweep setting(s) {unknown}; known: {list(SWEEP_FIELDS)}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str) -> SweepSpec:
        """Read a sweep specification file."""
        try:
            with open(path, "rb") as fh:
                return cls.from_dict(tomllib.load(fh))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read sweep spec {path!r}: {exc}") from exc

    def digest(self) -> str:
        """Canonical JSON (to refuse resuming a directory with a different grid)."""
        return json.dumps(self.to_dict(), sort_keys=True)
