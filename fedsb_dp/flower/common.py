"""What the Flower ClientApp and ServerApp share: the data-free model and the wire format.

Wire format (every value a Flower record type, nothing pickled):

* server → client, ``query`` (setup) and ``train``: ConfigRecord ``"setup"`` with the run's
  settings as canonical JSON (``run-config``), ``partition-seed``, ``init-seed`` and
  ``label-names``; ``train`` adds ConfigRecord ``"round"`` (the protocol's
  :class:`~fedsb_dp.federated.protocol.Instruction`: ``round``, ``client-id``,
  ``stream-index``, ``rank``, ``fingerprint`` and the local DP-SGD settings ``local-*``, σ
  included), ArrayRecord ``"arrays"`` (the state it starts from: R̄ and head, truncated to the
  client's rank; RoLoRA: only the factor trained this round) and, for FedEx-LoRA and FLoRA,
  ArrayRecord ``"base"`` (the folded base weights, so a node that missed a round or
  restarted stays bit-identical; FedSVD: the re-factorised A; RoLoRA: the frozen factor).
* client → server, ``query``: ConfigRecord ``"client"`` (``client-id``, ``num-records``,
  ``fingerprint``). Nᵢ is public in this project: it sets qᵢ = b/Nᵢ, which the server needs to
  calibrate σ, exactly as in the in-process engine.
* client → server, ``train``: ArrayRecord ``"arrays"`` (the client's R and head, nothing
  else) and ConfigRecord ``"privacy"`` (``client-id``, ``steps``, ``event`` as JSON,
  ``fingerprint``). No loss, no count, no metric computed on private records is sent.

"R̄ and head" stands for the method's trainable state: LoRA factors for the LoRA baselines,
and the head alone for ``head-only``, which injects no adapter (its ArrayRecords carry only
the head's tensors, and it has no folded base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from accounting import event_from_dict
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.client import ClientUpdate, LocalTrainingConfig
from fedsb_dp.federated.node_policy import AnnouncedPlan
from fedsb_dp.federated.protocol import Instruction
from fedsb_dp.federated.run_config import NOT_IN_DIGEST, RunConfig
from fedsb_dp.federated.setup import (
    inject,
    load_base_model,
    make_method,
)
from fedsb_dp.methods.state import load_tensors
from fedsb_dp.models import LoadedModel

DATA_FREE_INITS = ("w0-svd", "random-orthonormal")


def check_supported(config: RunConfig) -> None:
    """Refuse settings the Flower driver does not implement (before anything is spent).

    Every method and both DP levels run on Flower; two things do not: the centralised
    references (one pooled client is not a federation) and a data-dependent initialisation
    (every node must derive the same B and A without reading private records).

    Raises:
        ConfigError: For a ``central-*`` method or a gradient-SVD init.

    """
    if config.method_is_central:
        raise ConfigError(f"method={config.method!r} pools every record in one place; it is a "
                          "reference for the in-process engine, not a federation")
    if config.init not in DATA_FREE_INITS:
        raise ConfigError(
            f"init={config.init!r}: the Flower engine needs a data-free initialisation, one "
            f"of {DATA_FREE_INITS}, so that every node derives the same B and A without "
            "reading private records")


def build_model(config: RunConfig, *, num_labels: int, init_seed: int,
                device: str | None = None) -> LoadedModel:
    """Load the model and inject the agreed adapters — data-free, so every node can do it.

    Args:
        config: The run's settings.
        num_labels: Classes of the head.
        init_seed: Seed of the agreed adapter start.
        device: This node's ``--device`` value (its node config ``device``); ``None`` keeps
            ``config.device``. Not part of the run's definition: nodes may differ.

    """
    check_supported(config)
    if device is not None:
        config = dataclasses.replace(config, device=device)
    loaded = load_base_model(config, num_labels=num_labels)
    inject(config, make_method(config), loaded.model, init_seed=init_seed)
    return loaded


# ------------------------------------------------------------------ wire format
def run_config_json(config: RunConfig) -> str:
    """Canonical JSON of the settings that define the run.

    ``out`` is the server's business and ``device`` each node's own (its node config
    ``device``), so neither is sent.
    """
    return json.dumps({k: v for k, v in config.to_dict().items() if k not in NOT_IN_DIGEST},
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


_LOCAL_FIELDS = ("expected_batch_size", "local_steps", "learning_rate", "optimizer",
                 "max_grad_norm", "noise_multiplier", "max_physical_batch_size", "weight_decay")


def instruction_to_records(instruction: Instruction, base: Mapping[str, torch.Tensor], *,
                           target_delta: float) -> dict[str, Any]:
    """A ``train`` message's records: the instruction and any folded base weights.

    FedEx-LoRA and FLoRA fold updates into the base weights; sending those weights keeps a
    node that missed a round, or restarted, bit-identical to the server.
    """
    local = {f"local-{name.replace('_', '-')}": getattr(instruction.local, name)
             for name in _LOCAL_FIELDS}
    records: dict[str, Any] = {
        "arrays": state_to_record(instruction.state),
        "round": ConfigRecord({"round": instruction.round_index,
                               "client-id": instruction.client_id,
                               "stream-index": instruction.stream_index,
                               "rank": -1 if instruction.rank is None else instruction.rank,
                               "fingerprint": instruction.fingerprint,
                               # The plan a node checks: its σ and the δ it was calibrated at.
                               "noise-multiplier": float(instruction.local.noise_multiplier),
                               "target-delta": float(target_delta), **local}),
    }
    if base:
        records["base"] = state_to_record(base)
    return records


def records_to_instruction(content: Any) -> tuple[Instruction, dict[str, torch.Tensor]]:
    """Parse what :func:`instruction_to_records` wrote.

    Raises:
        ConfigError: If a record or field is missing or has the wrong type.

    """
    try:
        record = content.config_records["round"]
        local = LocalTrainingConfig(**{name: record[f"local-{name.replace('_', '-')}"]
                                       for name in _LOCAL_FIELDS})
        rank = int(record["rank"])
        instruction = Instruction(
            client_id=str(record["client-id"]), stream_index=int(record["stream-index"]),
            round_index=int(record["round"]), local=local,
            rank=None if rank < 0 else rank,
            state=record_to_state(content.array_records["arrays"]),
            fingerprint=str(record["fingerprint"]))
        base = (record_to_state(content.array_records["base"])
                if "base" in content.array_records else {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"malformed train instruction: {type(exc).__name__}: {exc}") from exc
    return instruction, base


def load_base(model: torch.nn.Module, base: Mapping[str, torch.Tensor]) -> None:
    """Set the folded base weights a ``train`` message carried (no-op when there are none)."""
    if base:
        load_tensors(model, base)
