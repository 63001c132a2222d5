"""What the Flower ClientApp and ServerApp share: the data-free model, client data, wire format.

Wire format (every value a Flower record type, nothing pickled):

* server → client, ``query`` (setup) and ``train``: ConfigRecord ``"setup"`` with the run's
  settings as canonical JSON (``run-config``), ``partition-seed``, ``init-seed`` and
  ``label-names``; ``train`` adds ConfigRecord ``"round"`` (``round``, ``noise-multiplier``,
  ``target-delta``, ``fingerprint``, ``client-id``) and ArrayRecord ``"arrays"`` (R̄ and head).
* client → server, ``query``: ConfigRecord ``"client"`` (``client-id``, ``num-records``,
  ``fingerprint``). Nᵢ is public in this project: it sets qᵢ = b/Nᵢ, which the server needs to
  calibrate σ, exactly as in the in-process engine.
* client → server, ``train``: ArrayRecord ``"arrays"`` (the client's R and head, nothing
  else) and ConfigRecord ``"privacy"`` (``client-id``, ``steps``, ``event`` as JSON,
  ``fingerprint``). No loss, no count, no metric computed on private records is sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from accounting import event_from_dict
from fedsb_dp.adapters import (
    SBConfig,
    find_target_modules,
    inject_adapters,
    random_orthonormal_init,
    w0_svd_init,
)
from fedsb_dp.data import TokenizedDataset, load_text_classification, make_collate
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client import ClientUpdate, DPClient
from fedsb_dp.federated.node_policy import AnnouncedPlan
from fedsb_dp.federated.partition import client_frames, partition_records
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.models import LoadedModel, load_model

TASK = "sequence-classification"
DATA_FREE_INITS = ("w0-svd", "random-orthonormal")


def check_supported(config: RunConfig) -> None:
    """Refuse settings the Flower path does not implement (before anything is spent).

    Raises:
        ConfigError: For another method than Fed-SB, rank-heterogeneous clients, client-level
            DP or a data-dependent initialisation.

    """
    method = config.method
    if method != "fedsb":
        raise ConfigError(f"method={method!r}: the Flower engine runs 'fedsb' only; use the "
                          "in-process engine for the baselines")
    if config.client_ranks is not None:
        raise ConfigError("client_ranks (rank-heterogeneous clients) are not implemented by "
                          "the Flower engine; leave client_ranks unset")
    if config.dp_level != "example":
        raise ConfigError(
            f"dp_level={config.dp_level!r}: the Flower engine implements record-level DP only "
            "('example'); use the in-process engine for client-level DP")
    if config.init not in DATA_FREE_INITS:
        raise ConfigError(
            f"init={config.init!r}: the Flower engine needs a data-free initialisation, one "
            f"of {DATA_FREE_INITS}, so that every node derives the same B and A without "
            "reading private records")


def client_id(partition_id: int) -> str:
    """Ledger key of the client holding partition ``partition_id`` (as in the engine)."""
    return f"client-{partition_id}"


def sb_config(config: RunConfig) -> SBConfig:
    """Adapter settings of a run (the same mapping as the in-process engine)."""
    return SBConfig(rank=config.rank, target_modules=config.targets,
                    dropout=config.adapter_dropout, train_head=config.train_head,
                    train_pooler=config.train_pooler)


def build_model(config: RunConfig, *, num_labels: int, init_seed: int) -> LoadedModel:
    """Load the model and inject the agreed B, A, R⁰ — data-free, so every node can do it.

    ``w0-svd`` is a function of the pretrained weights alone; ``random-orthonormal`` of
    ``init_seed``, which the server draws and sends (it is public: B and A are public).
    The head is drawn from a fixed seed by :func:`fedsb_dp.models.load_model`.
    """
    check_supported(config)
    loaded = load_model(config.model, task=TASK, num_labels=num_labels,
                        pooling=config.pooling)
    if not config.model_dropout:
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    sb = sb_config(config)
    model = loaded.model
    targets = find_target_modules(model, sb.resolved_targets(model.config.model_type),
                                  rank=config.rank)
    if config.init == "w0-svd":
        result = w0_svd_init(targets, rank=config.rank)
    else:
        result = random_orthonormal_init(targets, rank=config.rank, seed=init_seed)
    inject_adapters(model, result.factors, sb)
    return loaded


def load_client(
    config: RunConfig,
    *,
    partition_id: int,
    num_partitions: int,
    partition_seed: int,
    label_names: tuple[str, ...],
    tokenizer: object,
    data_path: str | None = None,
) -> DPClient:
    """The records this node holds, as a :class:`DPClient`.

    Without ``data_path`` the node loads ``config.dataset`` and keeps partition
    ``partition_id`` of the same seeded split (``config.partition``) the in-process engine
    makes (simulations and tests). With ``data_path`` (node config ``data-path``) it reads
    its own file, of which only the training split is used.

    Raises:
        ConfigError: If the partition does not fit the federation or the labels differ.

    """
    if num_partitions != config.clients:
        raise ConfigError(f"this node is one of num-partitions={num_partitions}, the run "
                          f"has clients={config.clients}; they must be equal")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} must be in [0, {num_partitions - 1}]")
    data = load_text_classification(
        data_path or config.dataset, text_column=config.text_column,
        text_pair_column=config.text_pair_column, label_column=config.label_column,
        max_train_records=None if data_path else config.max_train_records,
    )
    if tuple(data.label_names) != tuple(label_names):
        raise ConfigError(f"this node's labels {list(data.label_names)} differ from the "
                          f"federation's {list(label_names)}")
    if data_path:
        frame = data.train
    else:
        spec = config.partition
        # The engine's rule: non-IID splits must leave every client a full expected batch.
        parts = partition_records(
            data.train["label"].to_numpy(), spec, num_clients=num_partitions,
            seed=partition_seed, min_records=1 if spec == "iid" else config.batch_size)
        frame = client_frames(data.train, parts)[client_id(partition_id)]
    dataset = TokenizedDataset(frame, tokenizer, max_length=config.max_length)
    return DPClient(client_id(partition_id), dataset, make_collate(tokenizer), task=TASK)


# ------------------------------------------------------------------ wire format
def run_config_json(config: RunConfig) -> str:
    """Canonical JSON of the settings (``out`` is the server's business, not sent)."""
    return json.dumps({k: v for k, v in config.to_dict().items() if k != "out"},
                      sort_keys=True)


@dataclass(frozen=True)
class SetupInfo:
    """What every message tells a client about the run (all public)."""

    config: RunConfig
    partition_seed: int
    init_seed: int
    label_names: tuple[str, ...]

    def to_record(self) -> ConfigRecord:
        """As a Flower ConfigRecord."""
        return ConfigRecord({"run-config": run_config_json(self.config),
                             "partition-seed": self.partition_seed,
                             "init-seed": self.init_seed,
                             "label-names": list(self.label_names)})

    @classmethod
    def from_record(cls, record: Any) -> SetupInfo:
        """Parse the ConfigRecord written by :meth:`to_record`."""
        try:
            config = RunConfig.from_dict(json.loads(str(record["run-config"])))
            return cls(config=config, partition_seed=int(record["partition-seed"]),
                       init_seed=int(record["init-seed"]),
                       label_names=tuple(str(n) for n in record["label-names"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"malformed setup record from the server: {exc!r}") from exc

    def key(self) -> str:
        """Cache key of everything that determines the model and the client's data."""
        return json.dumps([run_config_json(self.config), self.partition_seed, self.init_seed,
                           list(self.label_names)])


def announced_plan(setup: SetupInfo, round_record: Mapping[str, Any]) -> AnnouncedPlan:
    """The plan a ``train`` message announces, as the node's policy checks it.

    Raises:
        ConfigError: If σ or δ is not a number.

    """
    try:
        sigma = float(round_record["noise-multiplier"])
        delta = round_record.get("target-delta")
        delta = float(delta) if delta is not None else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed round record from the server: {exc!r}") from exc
    digest = hashlib.sha256(setup.key().encode()).hexdigest()
    return AnnouncedPlan.from_run_config(setup.config, noise_multiplier=sigma,
                                         target_delta=delta, setup_digest=digest)


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Trainable tensors → ArrayRecord (values and dtypes are kept exactly)."""
    return ArrayRecord({k: v.detach().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord → trainable tensors."""
    return {k: torch.as_tensor(v).clone() for k, v in record.to_torch_state_dict().items()}


def update_to_records(update: ClientUpdate) -> dict[str, Any]:
    """A client's reply content: its R (and head) and its privacy events, nothing else."""
    return {
        "arrays": state_to_record(update.state),
        "privacy": ConfigRecord({"client-id": update.client_id, "steps": int(update.steps),
                                 "event": json.dumps(update.event.to_dict(), sort_keys=True),
                                 "fingerprint": update.fingerprint}),
    }


def records_to_update(content: Any) -> ClientUpdate:
    """Parse a ``train`` reply into a :class:`ClientUpdate` (structure only).

    Values are checked by :func:`fedsb_dp.federated.server.validate_update`.

    Raises:
        ConfigError: If a record or field is missing or has the wrong type.

    """
    try:
        arrays = content.array_records["arrays"]
        privacy = content.config_records["privacy"]
        steps = privacy["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps={steps!r} is not an integer")
        return ClientUpdate(
            client_id=str(privacy["client-id"]),
            state=record_to_state(arrays),
            steps=steps,
            event=event_from_dict(json.loads(str(privacy["event"]))),
            fingerprint=str(privacy["fingerprint"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"malformed train reply: {type(exc).__name__}: {exc}") from exc
