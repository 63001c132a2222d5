"""Settings of a federated run, validated before anything is loaded or spent."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from typing import Any

from accounting.accountants import ACCOUNTANTS
from fedsb_dp.adapters.initializers import GRADIENT_SOURCES, INIT_METHODS
from fedsb_dp.data import DEFAULT_DATASET
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client import OPTIMIZERS
from fedsb_dp.federated.partition import PartitionSpec
from fedsb_dp.methods import method_class
from fedsb_dp.models import DEFAULT_MODEL, POOLINGS

DP_LEVELS = ("example", "client")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Defaults give ``fedsb-dp run --epsilon 3``.

    ``train_pooler=True`` also trains the pooler of BERT-style classifiers (the offline
    MiniLM's pooler was never trained for classification), at the price of r²-scale → n²-scale
    noised parameters (148k for MiniLM), so it is off by default.

    ``learning_rate`` defaults to the method's own (``FederatedMethod.default_learning_rate``,
    tuned under DP in docs/benchmarks.md); the resolved value is what config.json records.

    ``max_grad_norm`` (C) defaults to 3: per-example gradient norms of the default model are
    of that order, and clipping far below them (the paper's C = 0.1) weighs every example
    equally whatever its loss, which on imbalanced labels drives the classifier to the
    majority class with growing confidence (measured in docs/benchmarks.md).

    Privacy: ``epsilon`` is the target for the whole run (init + all rounds); ``None`` means a
    non-private run (σ = 0), which must be asked for with ``no_dp=True``. ``delta`` defaults to
    a value well below 1/N_total.
    """

    # privacy
    epsilon: float | None = None
    delta: float | None = None
    no_dp: bool = False
    allow_large_delta: bool = False
    accountant: str = "prv"
    dp_level: str = "example"
    max_grad_norm: float = 3.0
    client_clip_norm: float = 0.05
    # method and adapters
    method: str = "fedsb"
    model: str = DEFAULT_MODEL
    rank: int = 16
    lora_scaling: float = 2.0
    client_ranks: tuple[int, ...] | None = None
    targets: tuple[str, ...] | None = None
    train_head: bool = True
    train_pooler: bool = False
    pooling: str = "auto"
    adapter_dropout: float = 0.0
    model_dropout: bool = True
    init: str = "w0-svd"
    init_source: str = "dp"
    init_examples: int = 64
    init_noise_multiplier: float = 8.0
    init_clip_norm: float = 1.0
    init_lr: float = 5e-4
    allow_nonprivate_init: bool = False
    init_data: str | None = None
    init_text_column: str = "text"
    init_text_pair_column: str | None = None
    init_label_column: str = "label"
    # data
    dataset: str = DEFAULT_DATASET
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 64
    max_train_records: int | None = None
    max_eval_records: int | None = None
    # federation
    partition: str = "iid"
    clients: int = 3
    rounds: int = 3
    local_steps: int = 10
    batch_size: int = 64
    max_physical_batch_size: int = 32
    learning_rate: float | None = None
    optimizer: str = "adamw"
    participation: float = 1.0
    min_clients: int = 1
    # run
    seed: int | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", tuple(self.client_ranks))
        method_cls = method_class(self.method)[0]  # names the valid methods
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", method_cls.default_learning_rate)
        PartitionSpec.parse(self.partition)  # names the valid kinds and ranges
        if not (self.lora_scaling > 0 and math.isfinite(self.lora_scaling)):
            raise ConfigError(f"lora_scaling={self.lora_scaling} must be a finite number > 0")
        if self.no_dp and self.epsilon is not None:
            raise ConfigError(
                f"epsilon={self.epsilon} and no_dp=True contradict each other: drop one"
            )
        if not self.no_dp:
            if self.epsilon is None:
                raise ConfigError("give a privacy target epsilon (e.g. 3), or no_dp=True")
            if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
                raise ConfigError(f"epsilon={self.epsilon} must be a finite number > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta={self.delta} must be in (0, 1)")
        self._choice("accountant", ACCOUNTANTS)
        self._choice("dp_level", DP_LEVELS)
        self._choice("init", INIT_METHODS)
        self._choice("init_source", GRADIENT_SOURCES)
        self._choice("optimizer", OPTIMIZERS)
        self._choice("pooling", POOLINGS)
        for name in ("rank", "clients", "rounds", "local_steps", "batch_size",
                     "max_physical_batch_size", "max_length", "init_examples", "min_clients"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("max_grad_norm", "client_clip_norm", "learning_rate", "init_clip_norm",
                     "init_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if not self.init_noise_multiplier >= 0:
            raise ConfigError(f"init_noise_multiplier={self.init_noise_multiplier} must be ≥ 0")
        if not 0 < self.participation <= 1:
            raise ConfigError(f"participation={self.participation} must be in (0, 1]")
        if self.min_clients > self.clients:
            raise ConfigError(f"min_clients={self.min_clients} exceeds clients={self.clients}")
        if not 0 <= self.adapter_dropout < 1:
            raise ConfigError(f"adapter_dropout={self.adapter_dropout} must be in [0, 1)")
        for name in ("max_train_records", "max_eval_records"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be ≥ 1")
        if self.init == "gradient-svd" and self.init_source == "nonprivate" and not (
            self.allow_nonprivate_init
        ):
            raise ConfigError(
                "init_source='nonprivate' reads raw private gradients (ε = ∞); add "
                "--allow-nonprivate-init to do it anyway, or use --init-source dp"
            )

        self._check_init_data()
        if self.dp_level == "client" and self.init == "gradient-svd" and (
            self.init_source != "public"
        ):
            raise ConfigError(
                "dp_level='client' accounts whole clients; a gradient-svd init on client data "
                "is a record-level release. Use --init w0-svd, random-orthonormal, or "
                "--init-source public --init-data PATH|HUB_ID (a public dataset, never the "
                "clients' records)")

        if self.client_ranks is not None:
            self._check_client_ranks()
        if self.method != "fedsb" and self.dp_level == "client":
            raise ConfigError(f"dp_level='client' is implemented for method='fedsb' only, not "
                              f"{self.method!r}")
        if method_class(self.method)[0].adapter == "lora" and self.init == "gradient-svd":
            raise ConfigError(f"init='gradient-svd' builds LoRA-SB factors; method="
                              f"{self.method!r} starts from random A and B = 0 (drop --init)")
        if self.method_is_central and self.dp_level == "client":
            raise ConfigError(f"method={self.method!r} is a single pooled client; "
                              "dp_level='client' needs a federation")
        if self.method_is_central and self.partition != "iid":
            raise ConfigError(f"method={self.method!r} trains on the pooled data; "
                              f"partition={self.partition!r} does not apply")

    def _check_init_data(self) -> None:
        public = self.init == "gradient-svd" and self.init_source == "public"
        if public and not self.init_data:
            raise ConfigError(
                "init_source='public' needs --init-data PATH|HUB_ID: a public dataset (with "
                "--init-text-column/--init-label-column if its columns differ), never the "
                "clients' own records")
        if self.init_data is not None and not public:
            raise ConfigError(
                f"init_data={self.init_data!r} is only read by --init gradient-svd "
                f"--init-source public, not init={self.init!r} with "
                f"init_source={self.init_source!r}; drop --init-data or change the init")
        if public and self.init_data == self.dataset:
            raise ConfigError(
                f"init_data={self.init_data!r} is the training dataset itself; a public init "
                "must not read the clients' records (use --init-source dp to learn it from "
                "them with DP, or a data-free --init)")

    def _check_client_ranks(self) -> None:
        ranks = self.client_ranks
        if self.method != "fedsb":
            raise ConfigError(f"client_ranks (rank-heterogeneous clients) need method='fedsb', "
                              f"not {self.method!r}")
        if len(ranks) != self.clients:
            raise ConfigError(f"client_ranks={list(ranks)} has {len(ranks)} entries for "
                              f"clients={self.clients}")
        for value in ranks:
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    1 <= value <= self.rank):
                raise ConfigError(f"client rank {value!r} in client_ranks={list(ranks)} must be "
                                  f"an integer in 1..{self.rank} (the global rank)")

    @property
    def method_is_central(self) -> bool:
        """Whether the method is a centralised reference (one client, pooled data)."""
        return method_class(self.method)[1]

    def _choice(self, name: str, options: tuple[str, ...]) -> None:
        if getattr(self, name) not in options:
            raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {options}")

    @property
    def private(self) -> bool:
        """Whether the run is differentially private."""
        return not self.no_dp

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary."""
        out = asdict(self)
        for name in ("targets", "client_ranks"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        return out

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the settings that define the run (not ``out``)."""
        body = {k: v for k, v in self.to_dict().items() if k != "out"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dictionary; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        normalised = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**normalised)

    @classmethod
    def from_toml(cls, path: str, **overrides: Any) -> RunConfig:
        """Read settings from a TOML file (a flat table, or a ``[run]`` table)."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path!r}: {exc}") from exc
        data = data.get("run", data)
        data.update(overrides)
        return cls.from_dict(data)
