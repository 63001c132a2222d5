"""Federated fine-tuning methods behind one interface: Fed-SB and the paper's baselines.

``METHODS`` maps a CLI name to (class, central?) — the ``central-*`` references train the
same adapters on the pooled data as a single client.
"""

from fedsb_dp.errors import ConfigError
from fedsb_dp.methods.base import (
    Aggregate,
    FederatedMethod,
    adapted_layers,
    effective_weights,
    trainable_count,
)
from fedsb_dp.methods.fedex_lora import FedExLoRA
from fedsb_dp.methods.fedit import FedIT
from fedsb_dp.methods.fedsb import FedSB, pad_state, set_active_rank, truncate_state
from fedsb_dp.methods.fedsvd import FedSVD
from fedsb_dp.methods.ffa_lora import FFALoRA
from fedsb_dp.methods.flora import FLoRA
from fedsb_dp.methods.head_only import HeadOnly
from fedsb_dp.methods.rolora import RoLoRA

METHODS: dict[str, tuple[type[FederatedMethod], bool]] = {
    "fedsb": (FedSB, False),
    "fedit": (FedIT, False),
    "ffa-lora": (FFALoRA, False),
    "fedex-lora": (FedExLoRA, False),
    "flora": (FLoRA, False),
    "fedsvd": (FedSVD, False),
    "rolora": (RoLoRA, False),
    "central-lora": (FedIT, True),
    "central-sb": (FedSB, True),
    "head-only": (HeadOnly, False),
}


def method_class(name: str) -> tuple[type[FederatedMethod], bool]:
    """The class of method ``name`` and whether it is a centralised reference.

    Raises:
        ConfigError: Unknown name (the message lists the valid ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method={name!r} is not one of {sorted(METHODS)}") from None


__all__ = [
    "METHODS", "Aggregate", "FFALoRA", "FLoRA", "FedExLoRA", "FedIT", "FedSB", "FedSVD",
    "FederatedMethod", "RoLoRA",
    "adapted_layers", "effective_weights", "method_class", "pad_state", "set_active_rank",
    "trainable_count",
    "truncate_state",
]
