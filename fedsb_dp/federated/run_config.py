"""Settings of a federated run, validated before anything is loaded or spent."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass
from typing import Any

from accounting.accountants import ACCOUNTANTS
from fedsb_dp.adapters.initializers import GRADIENT_SOURCES, INIT_METHODS
from fedsb_dp.data import DEFAULT_DATASET, EVAL_SAMPLES
from fedsb_dp.devices import DTYPES, check_device_name
from fedsb_dp.errors import ConfigError, SettingError, SettingsConflict
from fedsb_dp.federated.client import OPTIMIZERS
from fedsb_dp.federated.partition import LABEL_SKEWS, PartitionSpec
from fedsb_dp.federated.settings import check_type, setting, settings_of
from fedsb_dp.methods import METHODS, method_class
from fedsb_dp.models import CAUSAL_LM, DEFAULT_MODEL, POOLINGS, SEQUENCE_CLASSIFICATION, TASKS

DP_LEVELS = ("example", "client")
#: How σ is chosen: one for the whole federation, or one per client from its own Nᵢ.
NOISE_MODES = ("shared", "per-client")

#: Settings that do not define the run: left out of its digest and of a Flower setup record.
NOT_IN_DIGEST = ("out", "device")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Defaults give ``fedsb-dp run --epsilon 3``.

    Each field carries a :class:`~fedsb_dp.federated.settings.Setting` (help, unit, CLI
    aliases) from which the CLI flags, the TOML keys, the ``sweep --set`` keys and the Flower
    run config are generated: the field name is the setting's one name (hyphenated in flags
    and the Flower config). ``fedsb-dp run --help`` lists them with their defaults.

    ``learning_rate`` defaults to the method's own (``FederatedMethod.default_learning_rate``,
    tuned under DP in docs/benchmarks.md); the resolved value is what config.json records.

    ``max_grad_norm`` (C) defaults to 3: per-example gradient norms of the default model are
    of that order, and clipping far below them (the paper's C = 0.1) weighs every example
    equally whatever its loss, which on imbalanced labels drives the classifier to the
    majority class with growing confidence (measured in docs/benchmarks.md).

    Two settings keep their short user-facing names and are translated once: ``delta`` is the
    δ the user asks for (``None``: the protocol picks one well below 1/N) and becomes the
    ledger's ``target_delta`` in ``RoundProtocol.create``; ``batch_size`` is the expected
    Poisson batch size and becomes ``LocalTrainingConfig.expected_batch_size`` in
    ``privacy_unit.local_config``.
    """

    # privacy
    epsilon: float | None = setting(
        None, "privacy target ε for the whole run (initialisation and every round)",
        unset="none: required unless --no-dp")
    delta: float | None = setting(
        None, "δ of the (ε, δ) guarantee; recorded in the ledger as target_delta",
        unset="well below 1/N, N = records (clients at --dp-level client)")
    no_dp: bool = setting(False, "train without differential privacy (ε = ∞)")
    allow_large_delta: bool = setting(False, "accept δ ≥ 1/N (flagged in every report)")
    accountant: str = setting("prv", "privacy accountant; reports use its upper bound",
                              choices=ACCOUNTANTS)
    dp_level: str = setting(
        "example", "privacy unit: example (one record of one client) or client (a whole "
        "client: the server clips each update and adds noise; needs many clients)",
        choices=DP_LEVELS)
    noise: str = setting(
        "shared", "record-level σ: shared (one σ calibrated for the worst client, i.e. the "
        "smallest) or per-client (each client's σᵢ from its own Nᵢ, so each meets the "
        "target exactly)", choices=NOISE_MODES)
    max_grad_norm: float = setting(3.0, "per-example clip norm C of DP-SGD",
                                   unit="(L2 norm)", aliases=("--clip",))
    client_clip_norm: float = setting(
        0.05, "--dp-level client: clip norm S of one client's update", unit="(L2 norm)",
        aliases=("--client-clip",))
    # method and adapters
    method: str = setting("fedsb", "federated method; central-lora and central-sb are "
                          "pooled-data references", choices=tuple(METHODS))
    model: str = setting(DEFAULT_MODEL, "hub id, local directory, 'minilm' (offline), "
                         "'mpnet' or the decoder 'gemma-270m' (offline, opt-in installs)")
    rank: int = setting(16, "r, side of the trained r×r matrix (LoRA baselines: LoRA rank)")
    lora_scaling: float = setting(2.0, "s = alpha / r of the LoRA baselines")
    client_ranks: tuple[int, ...] | None = setting(
        None, "Fed-SB with rank-heterogeneous clients: one rank ≤ --rank per client, "
        "comma-separated", unset="every client at --rank")
    targets: tuple[str, ...] | None = setting(
        None, "target modules, comma-separated", unset="per model")
    train_head: bool = setting(True, "train the classification head (classifiers only: a "
                               "decoder's LM head stays frozen)",
                               off_alias="--frozen-head")
    train_pooler: bool = setting(
        False, "also train a BERT-style pooler with the head (the offline MiniLM's pooler "
        "was never trained for classification); noised and communicated like R, "
        "n²-scale instead of r²-scale (148k parameters for MiniLM)")
    pooling: str = setting("auto", "what the classifier reads (auto: mean for "
                           "sentence-transformers checkpoints, else cls)", choices=POOLINGS)
    adapter_dropout: float = setting(0.0, "dropout probability on the adapters' input")
    model_dropout: bool = setting(True, "keep the base model's dropout on while training")
    init: str = setting("w0-svd", "initialisation of the adapters' frozen factors",
                        choices=INIT_METHODS)
    init_source: str = setting(
        "dp", "gradient-svd data: dp (a DP estimate from the clients), public (needs "
        "--init-data) or nonprivate (ε = ∞, needs --allow-nonprivate-init)",
        choices=GRADIENT_SOURCES)
    init_examples: int = setting(
        64, "gradient-svd: expected records per client (source dp: each sampled with "
        "probability this / N_i) or public records used", unit="records")
    init_noise_multiplier: float = setting(8.0, "noise multiplier σ_init of --init-source dp")
    init_clip_norm: float = setting(1.0, "clip norm C_init of --init-source dp",
                                    unit="(L2 norm)", aliases=("--init-clip",))
    init_lr: float = setting(5e-4, "gradient-svd: step size of the approximated first "
                             "Adam step (scales R⁰ only)")
    allow_nonprivate_init: bool = setting(False, "permit --init-source nonprivate")
    init_data: str | None = setting(
        None, "public dataset of --init-source public (file or hub id; never the training "
        "data)", unset="none")
    init_text_column: str = setting("text", "text column of --init-data")
    init_text_pair_column: str | None = setting(None, "second text column of --init-data",
                                                unset="none")
    init_label_column: str = setting("label", "label column of --init-data")
    # task and data
    task: str = setting(
        SEQUENCE_CLASSIFICATION, "what to fine-tune: sequence-classification (a head on an "
        "encoder) or causal-lm (a decoder LM, loss on response tokens only)", choices=TASKS)
    prompt_column: str | None = setting(
        None, "causal-lm: prompt column (with --response-column)",
        unset="none: a label task (prompt from --text-column, response = label name)")
    response_column: str | None = setting(
        None, "causal-lm: response column (alone: a single text column, all of it trained)",
        unset="none")
    dataset: str = setting(DEFAULT_DATASET, "'rotten-tomatoes' or '20newsgroups' (offline), a "
                           "CSV/JSON/Parquet file, a directory (datasets.save_to_disk, or data "
                           "files), or a hub dataset name")
    dataset_config: str | None = setting(
        None, "configuration of a hub dataset with several (e.g. sst2 of nyu-mll/glue)",
        unset="none")
    train_split: str | None = setting(
        None, "split to train on", unset="every split not used for validation or test")
    validation_split: str | None = setting(
        None, "split to validate on", unset="'validation' if labelled, else hashed from train")
    test_split: str | None = setting(
        None, "split to test on", unset="'test' if labelled, else hashed from train")
    text_column: str = setting("text", "text column")
    text_pair_column: str | None = setting(None, "second text column (NLI pairs)",
                                           unset="none")
    label_column: str = setting("label", "label column")
    max_length: int = setting(64, "length of one example", unit="tokens")
    max_train_records: int | None = setting(None, "use only this many training records",
                                            unit="records", unset="all")
    max_eval_records: int | None = setting(None, "evaluate on at most this many records",
                                           unit="records", unset="all")
    eval_sample: str = setting(
        "hashed", "which records --max-eval-records keeps: hashed (a keyed-hash sample, the "
        "same for every run whatever the file's order) or head (the first in file order; "
        "runs saved before this setting existed)", choices=EVAL_SAMPLES)
    # federation
    partition: str = setting("iid", "iid, dirichlet:<alpha> (each label split among clients), "
                             "labelmix:<alpha> (equal sizes, each client's label mix ~ "
                             "Dirichlet), quantity:<beta> (size skew) or column:<NAME> (one "
                             "client per value of column NAME)")
    clients: int = setting(3, "number of clients (column:<NAME>: the number of distinct "
                           "values)", unit="clients")
    rounds: int = setting(3, "federated rounds", unit="rounds")
    local_steps: int = setting(10, "DP-SGD steps per client per round", unit="steps")
    # 128 rather than 64: at ε = 3 on the default task the larger q's higher σ is more than
    # paid back by averaging over twice the records (docs/benchmarks.md §7, training budget).
    batch_size: int = setting(
        128, "expected Poisson batch size b (each record sampled with probability b / N_i); "
        "the clients' expected_batch_size", unit="records")
    max_physical_batch_size: int = setting(32, "memory cap of one forward/backward chunk",
                                           unit="records")
    learning_rate: float | None = setting(None, "learning rate of the clients' optimizer",
                                          aliases=("--lr",), unset="the method's tuned one")
    optimizer: str = setting("adamw", "clients' optimizer", choices=OPTIMIZERS)
    participation: float = setting(1.0, "fraction of clients sampled per round")
    min_clients: int = setting(1, "fewest clients in a round")
    # hardware
    device: str = setting(
        "auto", "where the model trains: auto (a CUDA GPU when present), cpu, cuda or "
        "cuda:<index>; not part of the run's definition (a Flower node sets its own)")
    dtype: str = setting(
        "float32", "dtype of the frozen base model; R, the head and the DP noise stay float32",
        choices=tuple(DTYPES))
    # run
    seed: int | None = setting(None, "root seed: a reproducible run whose DP noise is NOT a "
                               "private release", unset="OS entropy")
    out: str | None = setting(None, "run directory", unset="runs/run-<timestamp>")

    def __post_init__(self) -> None:
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.client_ranks is not None:
            object.__setattr__(self, "client_ranks", tuple(self.client_ranks))
        # Each setting's own type and range first, so the error names what the user typed
        # rather than a combination it happens to break.
        for item in settings_of(RunConfig):
            check_type(item, getattr(self, item.name))
            if item.setting.choices is not None:
                self._choice(item.name, item.setting.choices)
        check_device_name(self.device)
        method_cls = method_class(self.method)[0]
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", method_cls.learning_rate_for(self.task))
        try:
            PartitionSpec.parse(self.partition)
        except ConfigError as exc:  # its message names the valid kinds and ranges
            reason = str(exc).removeprefix(f"partition={self.partition!r}: ")
            raise SettingError("partition", self.partition, f"is not valid: {reason}") from None
        if not (self.lora_scaling > 0 and math.isfinite(self.lora_scaling)):
            raise SettingError("lora_scaling", self.lora_scaling, "must be a finite number > 0")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise SettingError("epsilon", self.epsilon, "must be a finite number > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise SettingError("delta", self.delta, "must be in (0, 1)")
        for name in ("rank", "clients", "rounds", "local_steps", "batch_size",
                     "max_physical_batch_size", "max_length", "init_examples", "min_clients"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be a positive integer")
        for name in ("max_grad_norm", "client_clip_norm", "learning_rate", "init_clip_norm",
                     "init_lr"):
            if not getattr(self, name) > 0:
                raise SettingError(name, getattr(self, name), "must be > 0")
        if not self.init_noise_multiplier >= 0:
            raise SettingError("init_noise_multiplier", self.init_noise_multiplier,
                               "must be ≥ 0")
        if not 0 < self.participation <= 1:
            raise SettingError("participation", self.participation, "must be in (0, 1]")
        if not 0 <= self.adapter_dropout < 1:
            raise SettingError("adapter_dropout", self.adapter_dropout, "must be in [0, 1)")
        for name in ("max_train_records", "max_eval_records"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingError(name, value, "must be ≥ 1")
        # Then the combinations.
        if self.no_dp and self.epsilon is not None:
            raise SettingsConflict({"epsilon": self.epsilon, "no_dp": True},
                                   "{epsilon} and {no_dp} contradict each other: drop one")
        if not self.no_dp and self.epsilon is None:
            raise ConfigError("give a privacy target (--epsilon 3, or epsilon = 3 in a file), "
                              "or turn DP off (--no-dp, no_dp = true)")
        if self.min_clients > self.clients:
            raise SettingError("min_clients", self.min_clients,
                               f"exceeds clients={self.clients}")
        if self.init == "gradient-svd" and self.init_source == "nonprivate" and not (
            self.allow_nonprivate_init
        ):
            raise SettingsConflict(
                {"init_source": self.init_source},
                "{init_source} reads raw private gradients (ε = ∞); add "
                "--allow-nonprivate-init to do it anyway, or use --init-source dp")

        self._check_task()
        self._check_init_data()
        if self.dp_level == "client" and self.init == "gradient-svd" and (
            self.init_source != "public"
        ):
            raise SettingsConflict(
                {"dp_level": self.dp_level, "init": self.init},
                "{dp_level} accounts whole clients; {init} on client data is a record-level "
                "release. Use --init w0-svd, random-orthonormal, or --init-source public "
                "--init-data PATH|HUB_ID (a public dataset, never the clients' records)")

        if self.noise == "per-client" and self.dp_level == "client":
            raise ConfigError(
                "noise='per-client' calibrates each client's DP-SGD noise from its own "
                "records; dp_level='client' adds one noise at the server for the whole "
                "federation, so it has no per-client σ. Use --noise shared with "
                "--dp-level client")
        if self.noise == "per-client" and self.no_dp:
            raise ConfigError("noise='per-client' calibrates σᵢ for a privacy target; a "
                              "no_dp run adds no noise (drop --noise or --no-dp)")
        if self.client_ranks is not None:
            self._check_client_ranks()
        if self.method != "fedsb" and self.dp_level == "client":
            raise SettingsConflict({"dp_level": self.dp_level, "method": self.method},
                                   "{dp_level} is implemented for method fedsb only, not "
                                   "{method}")
        if method_class(self.method)[0].adapter != "lora-sb" and self.init == "gradient-svd":
            raise SettingsConflict({"init": self.init, "method": self.method},
                                   "{init} builds LoRA-SB factors; {method} has none (drop "
                                   "the init setting)")
        if self.method == "head-only" and not self.trains_head:
            raise SettingsConflict({"method": self.method},
                                   "{method} trains the classification head and nothing "
                                   "else; it needs --task sequence-classification and a "
                                   "trained head (drop --frozen-head)")
        if self.method_is_central and self.dp_level == "client":
            raise SettingsConflict({"method": self.method, "dp_level": self.dp_level},
                                   "{method} is a single pooled client; {dp_level} needs a "
                                   "federation")
        if self.method_is_central and self.partition != "iid":
            raise SettingsConflict({"method": self.method, "partition": self.partition},
                                   "{method} trains on the pooled data; {partition} does "
                                   "not apply")

    def _check_task(self) -> None:
        if self.task != CAUSAL_LM:
            for name in ("prompt_column", "response_column"):
                if getattr(self, name) is not None:
                    raise SettingError(name, getattr(self, name),
                                       f"needs task='{CAUSAL_LM}', not {self.task!r}")
            return
        if self.prompt_column is not None and self.response_column is None:
            raise SettingError("prompt_column", self.prompt_column,
                               "needs --response-column too (the tokens the loss covers)")
        if self.prompt_column is not None and self.prompt_column == self.response_column:
            raise SettingError("response_column", self.response_column,
                               "must differ from --prompt-column")
        for name in ("train_pooler", "text_pair_column"):
            if getattr(self, name):
                raise SettingError(name, getattr(self, name),
                                   f"applies to classifiers, not task='{CAUSAL_LM}'")
        if (self.lm_format != "label"
                and PartitionSpec.parse(self.partition).kind in LABEL_SKEWS):
            raise SettingError("partition", self.partition,
                               "skews labels, and free-form text has none; use iid, "
                               "quantity:<beta> or column:<NAME>")
        if self.init == "gradient-svd" and self.init_source == "public":
            raise SettingsConflict({"init_source": self.init_source, "task": self.task},
                                   "{init_source} reads a labelled classification dataset; "
                                   "with {task} use --init-source dp or a data-free --init")

    @property
    def trains_head(self) -> bool:
        """Whether a task head trains: a classifier's head if asked, never a decoder's LM head.

        The LM head is usually tied to the embeddings: vocabulary × hidden parameters to noise
        and send each round.
        """
        return self.train_head and self.task != CAUSAL_LM

    @property
    def lm_format(self) -> str | None:
        """How a causal-LM run reads its records (see :mod:`fedsb_dp.tasks.causal_lm`)."""
        if self.task != CAUSAL_LM:
            return None
        if self.response_column is None:
            return "label"
        return "text" if self.prompt_column is None else "prompt-response"

    def _check_init_data(self) -> None:
        public = self.init == "gradient-svd" and self.init_source == "public"
        if public and not self.init_data:
            raise ConfigError(
                "init_source='public' needs --init-data PATH|HUB_ID: a public dataset (with "
                "--init-text-column/--init-label-column if its columns differ), never the "
                "clients' own records")
        if self.init_data is not None and not public:
            raise SettingsConflict(
                {"init_data": self.init_data, "init": self.init, "init_source": self.init_source},
                "{init_data} is only read by --init gradient-svd --init-source public, not "
                "{init} with {init_source}; drop --init-data or change the init")
        if public and self.init_data == self.dataset:
            raise SettingsConflict(
                {"init_data": self.init_data},
                "{init_data} is the training dataset itself; a public init must not read the "
                "clients' records (use --init-source dp to learn it from them with DP, or a "
                "data-free --init)")

    def _check_client_ranks(self) -> None:
        ranks = self.client_ranks
        if self.method != "fedsb":
            raise SettingsConflict({"client_ranks": list(ranks), "method": self.method},
                                   "{client_ranks} (rank-heterogeneous clients) needs method "
                                   "fedsb, not {method}")
        if len(ranks) != self.clients:
            raise SettingsConflict({"client_ranks": list(ranks), "clients": self.clients},
                                   f"{{client_ranks}} has {len(ranks)} entries for "
                                   "{clients}")
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
            raise SettingError(name, getattr(self, name), f"is not one of {options}")

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
        """SHA-256 of the canonical JSON of the settings that define the run.

        ``out`` and ``device`` are left out: where a run is written and which processor
        computes it do not change what it computes (up to floating-point summation order),
        and a resumed run or a Flower node may use another device than the first call.
        ``dtype`` is in: a bfloat16 base is a different model.
        """
        body = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_DIGEST}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dictionary; unknown keys are an error naming them."""
        return cls(**_known_settings(data))

    @classmethod
    def from_toml(cls, path: str, **overrides: Any) -> RunConfig:
        """Read settings from a TOML file (a flat table, or a ``[run]`` table).

        Keys are the field names; ``overrides`` (the command line's flags) win.
        """
        return cls.from_dict({**read_settings_file(path), **overrides})


def _known_settings(data: dict[str, Any]) -> dict[str, Any]:
    known = {item.name for item in settings_of(RunConfig)}
    normalised = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
    return normalised


def read_settings_file(path: str) -> dict[str, Any]:
    """The run settings in a TOML file, by field name, not yet validated together.

    Raises:
        ConfigError: The file cannot be read or parsed, or has an unknown key.

    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc}") from exc
    return _known_settings(data.get("run", data))
