"""Privacy events: immutable descriptions of what was released, apart from how it is accounted.

The names, fields and meanings are those of Google's ``dp_accounting.dp_event`` so that
:func:`to_dp_accounting` / :func:`from_dp_accounting` are one-to-one. Events are validated
when built, serialise to JSON-safe dictionaries with a ``"type"`` tag, and are read back through
a closed registry: an unknown tag is an error, and nothing is ever imported, evaluated or
unpickled.

Unit conventions: a ``GaussianDpEvent(σ)`` is a Gaussian mechanism whose noise standard
deviation is σ times the L2 sensitivity; under add/remove-one-record neighbouring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accounting.errors import AccountingError, LedgerIntegrityError


class DpEvent:
    """Base class of all events."""

    type_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary with a ``"type"`` tag."""
        raise NotImplementedError


def _check_number(name: str, value: Any, *, low: float, high: float, low_open: bool = False,
                  high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise AccountingError(f"{name}={value!r} must be a number")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise AccountingError(f"{name}={value!r} must be in {left}{low}, {high}{right}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AccountingError(f"{name}={value!r} must be a non-negative integer")


def _check_event(name: str, value: Any) -> None:
    if not isinstance(value, DpEvent):
        raise AccountingError(f"{name}={value!r} must be a DpEvent")


@dataclass(frozen=True)
class NoOpDpEvent(DpEvent):
    """Nothing about private data was released (e.g. a data-free initialisation)."""

    type_name = "NoOp"

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name}


@dataclass(frozen=True)
class NonPrivateDpEvent(DpEvent):
    """Something computed from private data was released without a DP guarantee (ε = ∞)."""

    type_name = "NonPrivate"

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name}


@dataclass(frozen=True)
class GaussianDpEvent(DpEvent):
    """Gaussian mechanism with noise std ``noise_multiplier`` × L2 sensitivity.

    ``noise_multiplier = 0`` is allowed and means no noise: accountants treat it as
    non-private.
    """

    noise_multiplier: float
    type_name = "Gaussian"

    def __post_init__(self) -> None:
        _check_number("noise_multiplier", self.noise_multiplier, low=0.0, high=math.inf,
                      high_open=True)

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name, "noise_multiplier": float(self.noise_multiplier)}


@dataclass(frozen=True)
class PoissonSampledDpEvent(DpEvent):
    """``event`` applied to a Poisson sample: each record included independently with prob. q."""

    sampling_probability: float
    event: DpEvent
    type_name = "PoissonSampled"

    def __post_init__(self) -> None:
        _check_number("sampling_probability", self.sampling_probability, low=0.0, high=1.0)
        _check_event("event", self.event)

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name, "sampling_probability": float(self.sampling_probability),
                "event": self.event.to_dict()}


@dataclass(frozen=True)
class SampledWithoutReplacementDpEvent(DpEvent):
    """``event`` applied to a uniformly random subset of fixed size (replace-one relation)."""

    source_dataset_size: int
    sample_size: int
    event: DpEvent
    type_name = "SampledWithoutReplacement"

    def __post_init__(self) -> None:
        _check_count("source_dataset_size", self.source_dataset_size)
        _check_count("sample_size", self.sample_size)
        if self.sample_size > self.source_dataset_size:
            raise AccountingError(
                f"sample_size={self.sample_size} exceeds source_dataset_size="
                f"{self.source_dataset_size}")
        _check_event("event", self.event)

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name, "source_dataset_size": self.source_dataset_size,
                "sample_size": self.sample_size, "event": self.event.to_dict()}


@dataclass(frozen=True)
class SelfComposedDpEvent(DpEvent):
    """``event`` composed with itself ``count`` times."""

    event: DpEvent
    count: int
    type_name = "SelfComposed"

    def __post_init__(self) -> None:
        _check_event("event", self.event)
        _check_count("count", self.count)

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name, "event": self.event.to_dict(), "count": self.count}


@dataclass(frozen=True)
class ComposedDpEvent(DpEvent):
    """The sequential composition of ``events``."""

    events: tuple[DpEvent, ...]
    type_name = "Composed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        for index, event in enumerate(self.events):
            _check_event(f"events[{index}]", event)

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`DpEvent.to_dict`."""
        return {"type": self.type_name, "events": [e.to_dict() for e in self.events]}


_REGISTRY: dict[str, type[DpEvent]] = {
    cls.type_name: cls
    for cls in (NoOpDpEvent, NonPrivateDpEvent, GaussianDpEvent, PoissonSampledDpEvent,
                SampledWithoutReplacementDpEvent, SelfComposedDpEvent, ComposedDpEvent)
}


def sampled_gaussian_event(*, sampling_probability: float,
                           noise_multiplier: float) -> PoissonSampledDpEvent:
    """``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``: one Poisson-subsampled Gaussian release.

    The single place that builds the event charged for one DP-SGD step (q = b/Nᵢ), one DP
    initialisation sum (q = n_init/Nᵢ) and one client-level round with sampled clients (q = p).
    """
    return PoissonSampledDpEvent(sampling_probability=sampling_probability,
                                 event=GaussianDpEvent(noise_multiplier=noise_multiplier))


def event_from_dict(data: Any) -> DpEvent:
    """Rebuild an event from :meth:`DpEvent.to_dict` output (closed registry).

    Raises:
        LedgerIntegrityError: For an unknown type tag, missing or extra fields, or bad values.
    """
    if not isinstance(data, dict) or "type" not in data:
        raise LedgerIntegrityError(f"not an event: {data!r:.80}")
    cls = _REGISTRY.get(data["type"])
    if cls is None:
        raise LedgerIntegrityError(
            f"unknown event type {data['type']!r}; known types: {sorted(_REGISTRY)}")
    fields = {k: v for k, v in data.items() if k != "type"}
    try:
        if cls is PoissonSampledDpEvent:
            return cls(sampling_probability=fields.pop("sampling_probability"),
                       event=event_from_dict(fields.pop("event")), **fields)
        if cls is SampledWithoutReplacementDpEvent:
            return cls(source_dataset_size=fields.pop("source_dataset_size"),
                       sample_size=fields.pop("sample_size"),
                       event=event_from_dict(fields.pop("event")), **fields)
        if cls is SelfComposedDpEvent:
            return cls(event=event_from_dict(fields.pop("event")), count=fields.pop("count"),
                       **fields)
        if cls is ComposedDpEvent:
            return cls(events=tuple(event_from_dict(e) for e in fields.pop("events")), **fields)
        return cls(**fields)
    except (KeyError, TypeError) as exc:
        raise LedgerIntegrityError(f"malformed {data['type']} event {data!r:.120}: {exc}") from None
    except AccountingError as exc:
        raise LedgerIntegrityError(f"invalid {data['type']} event: {exc}") from None


def to_dp_accounting(event: DpEvent) -> Any:
    """Convert to the equivalent ``dp_accounting.dp_event`` object."""
    from dp_accounting import dp_event as g

    if isinstance(event, NoOpDpEvent):
        return g.NoOpDpEvent()
    if isinstance(event, NonPrivateDpEvent):
        return g.NonPrivateDpEvent()
    if isinstance(event, GaussianDpEvent):
        if event.noise_multiplier == 0:
            return g.NonPrivateDpEvent()
        return g.GaussianDpEvent(noise_multiplier=event.noise_multiplier)
    if isinstance(event, PoissonSampledDpEvent):
        return g.PoissonSampledDpEvent(sampling_probability=event.sampling_probability,
                                       event=to_dp_accounting(event.event))
    if isinstance(event, SampledWithoutReplacementDpEvent):
        return g.SampledWithoutReplacementDpEvent(
            source_dataset_size=event.source_dataset_size, sample_size=event.sample_size,
            event=to_dp_accounting(event.event))
    if isinstance(event, SelfComposedDpEvent):
        return g.SelfComposedDpEvent(event=to_dp_accounting(event.event), count=event.count)
    if isinstance(event, ComposedDpEvent):
        return g.ComposedDpEvent(events=[to_dp_accounting(e) for e in event.events])
    raise AccountingError(f"cannot convert {event!r}")


def from_dp_accounting(event: Any) -> DpEvent:
    """Convert a ``dp_accounting.dp_event`` object (of the supported kinds) to ours."""
    from dp_accounting import dp_event as g

    if isinstance(event, g.NoOpDpEvent):
        return NoOpDpEvent()
    if isinstance(event, g.NonPrivateDpEvent):
        return NonPrivateDpEvent()
    if isinstance(event, g.GaussianDpEvent):
        return GaussianDpEvent(noise_multiplier=event.noise_multiplier)
    if isinstance(event, g.PoissonSampledDpEvent):
        return PoissonSampledDpEvent(sampling_probability=event.sampling_probability,
                                     event=from_dp_accounting(event.event))
    if isinstance(event, g.SampledWithoutReplacementDpEvent):
        return SampledWithoutReplacementDpEvent(
            source_dataset_size=event.source_dataset_size, sample_size=event.sample_size,
            event=from_dp_accounting(event.event))
    if isinstance(event, g.SelfComposedDpEvent):
        return SelfComposedDpEvent(event=from_dp_accounting(event.event), count=event.count)
    if isinstance(event, g.ComposedDpEvent):
        return ComposedDpEvent(events=tuple(from_dp_accounting(e) for e in event.events))
    raise AccountingError(f"unsupported dp_accounting event {type(event).__name__}")


def flatten(event: DpEvent, count: int = 1) -> list[tuple[DpEvent, int]]:
    """Expand into (atomic event, total repetitions), atomic = not Composed/SelfComposed.

    Composition is commutative for every accountant here, so repetitions of the same atom are
    summed wherever they occur: a ledger of a million identical steps becomes one pair.
    Atoms keep the order of their first appearance.
    """
    totals: dict[DpEvent, int] = {}

    def visit(e: DpEvent, times: int) -> None:
        if times == 0:
            return
        if isinstance(e, SelfComposedDpEvent):
            visit(e.event, times * e.count)
        elif isinstance(e, ComposedDpEvent):
            for inner in e.events:
                visit(inner, times)
        else:
            totals[e] = totals.get(e, 0) + times

    visit(event, count)
    return list(totals.items())
