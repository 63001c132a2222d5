"""The interface every federated fine-tuning method implements (one file per method).

A method decides three things: which adapter it injects and which of its tensors train
(:meth:`FederatedMethod.inject`), how the server turns the clients' trainable states into the
next global model (:meth:`FederatedMethod.aggregate`), and what that costs on the wire (the
:class:`Aggregate`'s downlink). Every method's clients train with the same Opacus DP-SGD code
and the same calibrated σ: σ depends only on (ε, δ, q, steps), never on the method.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedsb_dp.adapters.config import SBConfig
from fedsb_dp.adapters.export import set_trainable_state
from fedsb_dp.adapters.inject import frozen_fingerprint, mark_trainable, trainable_state
from fedsb_dp.adapters.layer import SBLinear
from fedsb_dp.adapters.lora import LoRALinear, lora_layers
from fedsb_dp.errors import ConfigError
from fedsb_dp.methods.mean import weighted_mean
from fedsb_dp.methods.state import (
    BASE_SUFFIX,
    adapted_base_weights,
    load_tensors,
    lora_adapter_tensors,
)

LORA_ADAPTER = "lora_adapter.safetensors"


@dataclass
class Aggregate:
    """The server's output for one round.

    Attributes:
        state: The next global trainable state (what clients start the next round from).
        base_updates: Layer name → dense ΔW folded into that layer's frozen base weight
            (FedEx-LoRA's residual, FLoRA's merged stack); empty for the other methods.
        downlink: Every tensor the server must send each client for the next round.
        details: Method-specific notes (e.g. how a residual was encoded).
    """

    state: dict[str, torch.Tensor]
    base_updates: dict[str, torch.Tensor] = field(default_factory=dict)
    downlink: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)


def normalised_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """Convex weights pᵢ (uniform when ``None``)."""
    if count == 0:
        raise ConfigError("cannot aggregate zero client updates")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"aggregation weights {list(weights)} must be {count} values ≥ 0 with "
                          "a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


def trainable_count(model: nn.Module) -> int:
    """How many parameters of ``model`` train now (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter-carrying layer (LoRA-SB or LoRA), by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SBLinear | LoRALinear)}


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 + ΔW of every adapted layer: what the model computes, whatever the adapter."""
    return {name: (layer.base_layer.weight + layer.get_delta_weight()).detach().clone()
            for name, layer in adapted_layers(model).items()}


LORA_LEARNING_RATE = 1e-2
SB_LEARNING_RATE = 3e-2


class FederatedMethod(ABC):
    """One federated fine-tuning algorithm.

    Args:
        rank: Adapter rank r.
        scaling: s in front of the adapter product (LoRA: alpha / r).
        dropout: Adapter dropout.
        train_head: Also train (noise, communicate, average) the classification head.
        train_pooler: Also train a BERT-style pooler with the head.
    """

    name: ClassVar[str]
    adapter: ClassVar[str]  # "lora-sb" or "lora"
    exact: ClassVar[bool]
    # FedEx-LoRA and FLoRA change the frozen base weights every round: their checkpoints,
    # adapters and client messages must carry those weights too.
    folds_base: ClassVar[bool] = False
    description: ClassVar[str]
    # AdamW step size a run uses unless told otherwise; tuned per method under DP (the trained
    # parameters differ in kind and count), see docs/benchmarks.md.
    default_learning_rate: ClassVar[float] = LORA_LEARNING_RATE
    # Its step size on a decoder (``--task causal-lm``) where one was measured; None: the same.
    causal_lm_learning_rate: ClassVar[float | None] = None
    # Rounds after which begin_round's trainable set repeats (RoLoRA alternates: 2).
    round_cycle: ClassVar[int] = 1

    @classmethod
    def learning_rate_for(cls, task: str) -> float:
        """The default step size of this method on ``task``."""
        if task == "causal-lm" and cls.causal_lm_learning_rate is not None:
            return cls.causal_lm_learning_rate
        return cls.default_learning_rate

    def __init__(self, *, rank: int, scaling: float = 1.0, dropout: float = 0.0,
                 train_head: bool = True, train_pooler: bool = False) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank={rank!r} must be a positive integer")
        if not scaling > 0:
            raise ConfigError(f"scaling={scaling!r} must be > 0")
        self.rank = rank
        self.scaling = float(scaling)
        self.dropout = dropout
        self.train_head = train_head
        self.train_pooler = train_pooler

    @abstractmethod
    def inject(self, model: nn.Module, targets: Mapping[str, nn.Linear], *,
               generator: torch.Generator, factors: Mapping[str, object] | None = None) -> None:
        """Wrap the targets in this method's adapter and freeze what must not train.

        Args:
            model: Modified in place.
            targets: Qualified name → linear layer.
            generator: Public randomness for random factors (shared by every client).
            factors: LoRA-SB factors from an initialiser (Fed-SB only).
        """

    def _mark_trainable(self, model: nn.Module, lora_train_A: bool = True) -> None:
        """Freeze everything, then unfreeze by module identity (never by name substring)."""
        mark_trainable(model, train_head=self.train_head, train_pooler=self.train_pooler)
        for layer in lora_layers(model).values():
            layer.lora_A.weight.requires_grad_(lora_train_A)
            layer.lora_B.weight.requires_grad_(True)

    def aggregate(self, model: nn.Module, global_state: Mapping[str, torch.Tensor],
                  states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float] | None = None, *,
                  generator: torch.Generator | None = None) -> Aggregate:
        """Turn the clients' trainable states into the next global model.

        Default: a fresh weighted mean of every trainable tensor (exact when ΔW is linear in
        the trained tensors).

        Args:
            model: The server's model (at the current global state and base weights).
            global_state: The state the clients started this round from.
            states: One trainable state per client (its reply).
            weights: Public aggregation weights (uniform when ``None``).
            generator: Public randomness for methods that restart adapters (FLoRA).
        """
        del model, global_state, generator
        mean = weighted_mean(states, normalised_weights(len(states), weights))
        return Aggregate(state=mean, downlink=dict(mean))

    def apply(self, model: nn.Module, aggregate: Aggregate) -> None:
        """Load the aggregate into the (server's) model: fold base updates, set the state."""
        layers = adapted_layers(model)
        for name, delta in aggregate.base_updates.items():
            layers[name].fold_into_base(delta)
        set_trainable_state(model, aggregate.state)

    def begin_round(self, model: nn.Module, round_index: int) -> None:
        """Set which tensors train in round ``round_index`` (0-based); a no-op by default.

        Alternating methods (RoLoRA) train one factor per round. The server calls this
        before it reads the round's global state; clients train exactly the tensors their
        instruction carries (:func:`fedsb_dp.adapters.inject.train_only`).
        """
        del model, round_index

    def end_round(self, model: nn.Module) -> None:
        """Undo :meth:`begin_round` (checkpoints and adapters hold every factor)."""
        del model

    def noised_parameters(self, model: nn.Module) -> int:
        """The most parameters one DP-SGD step clips and noises, over the rounds.

        The dimension d of the noise vector, so σ·C·√d is a step's noise norm: the largest
        trainable set :meth:`begin_round` selects over one :attr:`round_cycle`.
        """
        counts = []
        for round_index in range(self.round_cycle):
            self.begin_round(model, round_index)
            counts.append(trainable_count(model))
        self.end_round(model)
        return max(counts)

    def setup_payload(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Frozen adapter tensors every client must receive once, before round 1."""
        del model
        return {}

    def base_updates(self, downlink: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer → ΔW to fold into its base weight, decoded from a round's downlink.

        The server folds exactly what a client decodes from the same tensors, so the two
        models stay bit-identical (their fingerprints are compared every round).
        """
        del downlink
        return {}

    def shared_base(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Frozen tensors this method changes, which a stateless client must receive.

        The folded base weights of FedEx-LoRA and FLoRA; FedSVD's re-factorised A; the
        factor RoLoRA holds fixed this round.
        """
        return adapted_base_weights(model) if self.folds_base else {}

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The global state after a round: trainable tensors, plus changed frozen ones."""
        tensors = {k: v.contiguous() for k, v in trainable_state(model).items()}
        tensors.update({k: v.detach().to("cpu").contiguous()
                        for k, v in self.shared_base(model).items()})
        return tensors

    def restore(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`checkpoint_tensors` returned (all or nothing)."""
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        frozen = {k: v for k, v in tensors.items()
                  if k.endswith(BASE_SUFFIX) or k not in trainable}
        load_tensors(model, frozen)
        set_trainable_state(model, {k: v for k, v in tensors.items() if k not in frozen})

    def save_adapter(self, model: nn.Module, directory: str, sb: SBConfig, *,
                     base_model: str) -> None:
        """Save every adapter tensor (frozen ones too) so a fresh base model can rebuild it."""
        del sb
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = lora_adapter_tensors(model)
        if self.folds_base:
            tensors.update(adapted_base_weights(model))
        path = os.path.join(directory, LORA_ADAPTER)
        save_file(tensors, path + ".tmp",
                  metadata={"method": self.name, "base_model": base_model,
                            "frozen_fingerprint": frozen_fingerprint(model)})
        os.replace(path + ".tmp", path)

    def load_adapter(self, model: nn.Module, directory: str,
                     targets: Mapping[str, nn.Linear]) -> None:
        """Inject this method's adapter into a fresh base model and load a saved one."""
        from safetensors.torch import load_file

        # The saved tensors overwrite every drawn factor, so the generator does not matter.
        self.inject(model, targets, generator=torch.Generator().manual_seed(0))
        load_tensors(model, load_file(os.path.join(directory, LORA_ADAPTER)))


def mean_of_products(states: Sequence[Mapping[str, torch.Tensor]], p: Sequence[float],
                     name: str, scaling: float) -> torch.Tensor:
    """Σ pᵢ s·BᵢAᵢ of one LoRA layer, in float64 (the exact mean of the clients' ΔW)."""
    total = torch.zeros(())
    for state, weight in zip(states, p, strict=True):
        B = state[f"{name}.lora_B.weight"].double()
        A = state[f"{name}.lora_A.weight"].double()
        total = total + weight * scaling * (B @ A)
    return total



def stacked_factors(states: Sequence[Mapping[str, torch.Tensor]], p: Sequence[float],
                    name: str, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[p₁s·B₁ … p_cs·B_c] and [A₁; …; A_c] of one LoRA layer: their product is Σ pᵢ s·BᵢAᵢ."""
    B = torch.cat([w * scaling * s[f"{name}.lora_B.weight"] for w, s in zip(p, states,
                                                                           strict=True)], dim=1)
    A = torch.cat([s[f"{name}.lora_A.weight"] for s in states], dim=0)
    return B, A
