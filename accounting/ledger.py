"""The privacy ledger: every release about each client's records, as executed.

On disk it is JSON::

    {"schema": "fedsb-dp/ledger/v1",
     "sha256": <hex digest of the canonical JSON of "body">,
     "body": {"unit", "dataset_sizes", "target_epsilon", "target_delta", "allow_large_delta",
              "metadata", "entries": [...], "pending": [...]}}

``entries`` are runs of identical releases per client (``{"client", "kind", "event", "count",
"rounds": [first, last]}``); consecutive identical releases of a client are merged by adding
their counts, so a 1000-round ledger stays small. ``pending`` holds reservations: releases
written down *before* their noise is drawn. They count exactly like entries, so a crash between
reservation and commit leaves the round charged.

``metadata["recorded_plan"]``, when present, is the plan the run was calibrated for
(:class:`accounting.plan.RecordedPlan`, its own format tag ``fedsb-dp/plan/v1``): it must agree
with the header (unit, keys, targets) and never changes once saved. The body's shape is the
same with or without it, so ledgers written before plans were recorded still load (their
:attr:`PrivacyLedger.plan` is ``None``) and older readers still read newer ledgers.

Saving is atomic (temp file, fsync, rename, fsync of the directory) and append-only: a save
that would drop or shrink anything already on disk, or change its plan, is refused. Loading
checks the schema tag and the hash and parses events (the plan's included) through a closed
registry; nothing is imported or unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
from typing import Any

from accounting.delta import check_delta
from accounting.errors import AccountingError, LedgerIntegrityError
from accounting.events import (
    ComposedDpEvent,
    DpEvent,
    NoOpDpEvent,
    SelfComposedDpEvent,
    event_from_dict,
)
from accounting.plan import PLAN_KEY, RecordedPlan

SCHEMA = "fedsb-dp/ledger/v1"
UNITS = ("example", "client")


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _event_key(event_dict: dict[str, Any]) -> str:
    return json.dumps(event_dict, sort_keys=True)


class PrivacyLedger:
    """Per-client histories of privacy events.

    Args:
        unit: ``"example"`` (record-level, add/remove one record of one client) or
            ``"client"`` (client-level; keys are then whole cohorts, e.g. ``"federation"``).
        dataset_sizes: Records per client (public), client id → N_i ≥ 1.
        target_epsilon: The run's budget, or ``None`` (non-private runs).
        target_delta: δ, checked against 1/N_total for the example unit.
        allow_large_delta: Accept δ ≥ 1/N_total (flagged as ``large_delta`` in the ledger).
        metadata: JSON-safe facts about the run (seed mode, mechanism settings…); a
            ``"recorded_plan"`` entry must be a valid plan dictionary. (A node's ledger
            keeps the server's announced plan under ``"plan"``: another format, not read here.)
        plan: The plan the run was calibrated for, stored as ``metadata["recorded_plan"]``.

    Raises:
        AccountingError: For a bad header value, or a plan that disagrees with the header.
    """

    def __init__(
        self,
        *,
        unit: str = "example",
        dataset_sizes: dict[str, int],
        target_epsilon: float | None,
        target_delta: float,
        allow_large_delta: bool = False,
        metadata: dict[str, Any] | None = None,
        plan: RecordedPlan | None = None,
    ) -> None:
        if unit not in UNITS:
            raise AccountingError(f"unit={unit!r} is not one of {UNITS}")
        if not dataset_sizes:
            raise AccountingError("dataset_sizes must name at least one client")
        for cid, size in dataset_sizes.items():
            if not isinstance(cid, str) or not cid:
                raise AccountingError(f"client id {cid!r} must be a non-empty string")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise AccountingError(f"dataset size of {cid!r} = {size!r} must be an int ≥ 1")
        if target_epsilon is not None and not target_epsilon > 0:
            raise AccountingError(f"target_epsilon={target_epsilon!r} must be > 0 (or None)")
        n_total = sum(dataset_sizes.values())
        large = (check_delta(target_delta, n_total=n_total, allow_large=allow_large_delta)
                 if unit == "example" else False)
        self._body: dict[str, Any] = {
            "unit": unit,
            "dataset_sizes": dict(dataset_sizes),
            "target_epsilon": target_epsilon,
            "target_delta": target_delta,
            "allow_large_delta": bool(allow_large_delta),
            "large_delta": large,
            "metadata": copy.deepcopy(metadata or {}),
            "entries": [],
            "pending": [],
        }
        if plan is not None:
            self._body["metadata"][PLAN_KEY] = plan.to_dict()
        self._plan = self._read_plan()

    def _read_plan(self) -> RecordedPlan | None:
        """Parse ``metadata["recorded_plan"]`` and check it against the header."""
        data = self._body["metadata"].get(PLAN_KEY)
        if data is None:
            return None
        plan = RecordedPlan.from_dict(data)
        header = self._body
        problems = []
        if plan.unit != header["unit"]:
            problems.append(f"unit {plan.unit!r} ≠ ledger's {header['unit']!r}")
        if set(plan.sampling_probabilities) != set(header["dataset_sizes"]):
            problems.append(f"keys {sorted(plan.sampling_probabilities)} ≠ ledger's "
                            f"{sorted(header['dataset_sizes'])}")
        if plan.target_delta != header["target_delta"]:
            problems.append(f"δ {plan.target_delta!r} ≠ ledger's {header['target_delta']!r}")
        if plan.target_epsilon != header["target_epsilon"]:
            problems.append(f"target ε {plan.target_epsilon!r} ≠ ledger's "
                            f"{header['target_epsilon']!r}")
        if problems:
            raise AccountingError("the recorded plan disagrees with the ledger header: "
                                  + "; ".join(problems))
        return plan

    # ---------------------------------------------------------------- properties
    @property
    def unit(self) -> str:
        """The privacy unit."""
        return self._body["unit"]

    @property
    def clients(self) -> list[str]:
        """Client ids, in the order given."""
        return list(self._body["dataset_sizes"])

    @property
    def dataset_sizes(self) -> dict[str, int]:
        """Records per client."""
        return dict(self._body["dataset_sizes"])

    @property
    def n_total(self) -> int:
        """Records over all clients."""
        return sum(self._body["dataset_sizes"].values())

    @property
    def target_epsilon(self) -> float | None:
        """The budget."""
        return self._body["target_epsilon"]

    @property
    def target_delta(self) -> float:
        """δ."""
        return self._body["target_delta"]

    @property
    def large_delta(self) -> bool:
        """True if δ ≥ 1/N_total was accepted by override (must be flagged)."""
        return bool(self._body["large_delta"])

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the run's metadata."""
        return copy.deepcopy(self._body["metadata"])

    @property
    def plan(self) -> RecordedPlan | None:
        """The plan the run was calibrated for, or ``None`` for a ledger that predates it."""
        return self._plan

    # ---------------------------------------------------------------- recording
    def _check_client(self, client_id: str) -> None:
        if client_id not in self._body["dataset_sizes"]:
            raise AccountingError(f"unknown client {client_id!r}; known: {self.clients}")

    @staticmethod
    def _check_release(event: DpEvent, count: int) -> None:
        if not isinstance(event, DpEvent):
            raise AccountingError(f"event={event!r} must be a DpEvent")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AccountingError(f"count={count!r} must be a non-negative integer")

    def record(self, client_id: str, event: DpEvent, *, count: int = 1,
               round_index: int | None = None, kind: str = "dp-sgd") -> None:
        """Append ``count`` executions of ``event`` on ``client_id``'s records.

        Only releases that happened are recorded; there is no parameter for a participation
        probability, so the "K·T steps at rate p·q" shortcut cannot be expressed.
        """
        self._check_client(client_id)
        self._check_release(event, count)
        if count == 0:
            return
        self._append(client_id, event.to_dict(), count, round_index, kind)

    def _append(self, client_id: str, event_dict: dict[str, Any], count: int,
                round_index: int | None, kind: str) -> None:
        entries = self._body["entries"]
        last = next((e for e in reversed(entries) if e["client"] == client_id), None)
        if (last is not None and last["kind"] == kind
                and _event_key(last["event"]) == _event_key(event_dict)):
            last["count"] += count
            if round_index is not None:
                first, final = last["rounds"] or [round_index, round_index]
                last["rounds"] = [min(first, round_index), max(final, round_index)]
            return
        entries.append({
            "client": client_id, "kind": kind, "event": event_dict, "count": count,
            "rounds": [round_index, round_index] if round_index is not None else None,
        })

    def reserve(self, events_by_client: dict[str, tuple[DpEvent, int]], *,
                round_index: int | None, kind: str = "dp-sgd") -> str:
        """Write releases down before they happen; they count from now on.

        Returns:
            The reservation id for :meth:`commit`.
        """
        for cid, (event, count) in events_by_client.items():
            self._check_client(cid)
            self._check_release(event, count)
        reservation = uuid.uuid4().hex
        self._body["pending"].append({
            "reservation": reservation, "round": round_index, "kind": kind,
            "releases": {cid: {"event": e.to_dict(), "count": c}
                         for cid, (e, c) in events_by_client.items()},
        })
        return reservation

    def commit(self, reservation: str) -> None:
        """Move a reservation into the entries (its releases happened)."""
        pending = self._body["pending"]
        index = next((i for i, p in enumerate(pending) if p["reservation"] == reservation), None)
        if index is None:
            raise AccountingError(f"no pending reservation {reservation!r}")
        item = pending.pop(index)
        for cid, release in item["releases"].items():
            if release["count"]:
                self._append(cid, release["event"], release["count"], item["round"],
                             item["kind"])

    # ---------------------------------------------------------------- reading
    def _releases(self, client_id: str) -> list[tuple[dict[str, Any], int, str]]:
        out = [(e["event"], e["count"], e["kind"]) for e in self._body["entries"]
               if e["client"] == client_id]
        for item in self._body["pending"]:
            release = item["releases"].get(client_id)
            if release is not None:
                out.append((release["event"], release["count"], item["kind"]))
        return out

    def client_event(self, client_id: str) -> DpEvent:
        """Everything released about ``client_id``'s records (reservations included)."""
        self._check_client(client_id)
        parts = tuple(SelfComposedDpEvent(event_from_dict(e), c)
                      for e, c, _ in self._releases(client_id))
        return ComposedDpEvent(parts) if parts else NoOpDpEvent()

    def steps(self, client_id: str, *, kind: str | None = "dp-sgd") -> int:
        """How many releases of ``kind`` (all kinds for ``None``) the client is charged."""
        self._check_client(client_id)
        return sum(c for _, c, k in self._releases(client_id) if kind is None or k == kind)

    @property
    def pending(self) -> list[str]:
        """Ids of reservations not yet committed."""
        return [p["reservation"] for p in self._body["pending"]]

    @property
    def pending_rounds(self) -> list[int | None]:
        """Round indices of reservations not yet committed (0-based; ``None`` outside rounds).

        Their releases may have happened although their round never completed.
        """
        return [p["round"] for p in self._body["pending"]]

    # ---------------------------------------------------------------- persistence
    def to_json_dict(self) -> dict[str, Any]:
        """The on-disk document (schema tag, hash, body)."""
        body = copy.deepcopy(self._body)
        return {"schema": SCHEMA, "sha256": hashlib.sha256(_canonical(body)).hexdigest(),
                "body": body}

    @classmethod
    def from_json_dict(cls, document: Any) -> PrivacyLedger:
        """Validate and rebuild a ledger from :meth:`to_json_dict` output.

        Raises:
            LedgerIntegrityError: Wrong schema, hash mismatch, or malformed content.
        """
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            found = document.get("schema") if isinstance(document, dict) else type(document)
            raise LedgerIntegrityError(f"not a {SCHEMA} ledger (schema {found!r})")
        body = document.get("body")
        if not isinstance(body, dict):
            raise LedgerIntegrityError("ledger has no body")
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        if digest != document.get("sha256"):
            raise LedgerIntegrityError(
                "ledger content does not match its sha256: the file was edited or corrupted")
        required = {"unit", "dataset_sizes", "target_epsilon", "target_delta",
                    "allow_large_delta", "large_delta", "metadata", "entries", "pending"}
        if set(body) != required:
            raise LedgerIntegrityError(
                f"ledger body keys {sorted(body)} differ from the schema's {sorted(required)}")
        try:
            ledger = cls(unit=body["unit"], dataset_sizes=body["dataset_sizes"],
                         target_epsilon=body["target_epsilon"],
                         target_delta=body["target_delta"],
                         allow_large_delta=body["allow_large_delta"],
                         metadata=body["metadata"])
        except AccountingError as exc:
            raise LedgerIntegrityError(f"invalid ledger header: {exc}") from None
        for entry in body["entries"]:
            if set(entry) != {"client", "kind", "event", "count", "rounds"}:
                raise LedgerIntegrityError(f"malformed ledger entry {entry!r:.120}")
            ledger._check_client(entry["client"])
            event_from_dict(entry["event"])
            ledger._check_release(NoOpDpEvent(), entry["count"])
        for item in body["pending"]:
            if set(item) != {"reservation", "round", "kind", "releases"}:
                raise LedgerIntegrityError(f"malformed reservation {item!r:.120}")
            for cid, release in item["releases"].items():
                ledger._check_client(cid)
                event_from_dict(release["event"])
                ledger._check_release(NoOpDpEvent(), release["count"])
        ledger._body = copy.deepcopy(body)
        return ledger

    @classmethod
    def load(cls, path: str) -> PrivacyLedger:
        """Read and validate a ledger file (see :meth:`from_json_dict`)."""
        try:
            with open(path, encoding="utf-8") as fh:
                document = json.load(fh)
        except json.JSONDecodeError as exc:
            raise LedgerIntegrityError(f"{path} is not valid JSON (truncated?): {exc}") from None
        except OSError as exc:
            raise LedgerIntegrityError(f"cannot read ledger {path}: {exc}") from None
        return cls.from_json_dict(document)

    def _check_append_only(self, old: PrivacyLedger) -> None:
        """Refuse a save that would forget or rewrite anything already on disk."""
        for key in ("unit", "dataset_sizes", "target_epsilon", "target_delta",
                    "allow_large_delta"):
            if old._body[key] != self._body[key]:
                raise LedgerIntegrityError(
                    f"ledger header {key!r} changed from {old._body[key]!r} to "
                    f"{self._body[key]!r}; ledgers are append-only")
        if old._body["metadata"].get(PLAN_KEY) != self._body["metadata"].get(PLAN_KEY):
            raise LedgerIntegrityError("the ledger's recorded plan changed; a plan is fixed "
                                       "before the first release")
        for cid in old.clients:
            before = [e for e in old._body["entries"] if e["client"] == cid]
            after = [e for e in self._body["entries"] if e["client"] == cid]
            if len(after) < len(before) or after[: len(before) - 1] != before[:-1]:
                raise LedgerIntegrityError(f"history of {cid!r} was rewritten; refusing to save")
            if before:
                b, a = before[-1], after[len(before) - 1]
                if (a["kind"], _event_key(a["event"])) != (b["kind"], _event_key(b["event"])) \
                        or a["count"] < b["count"]:
                    raise LedgerIntegrityError(f"last run of {cid!r} shrank; refusing to save")
            totals_before: dict[tuple[str, str], int] = {}
            totals_after: dict[tuple[str, str], int] = {}
            for source, totals in ((old, totals_before), (self, totals_after)):
                for event, count, kind in source._releases(cid):
                    key = (kind, _event_key(event))
                    totals[key] = totals.get(key, 0) + count
            for key, count in totals_before.items():
                if totals_after.get(key, 0) < count:
                    raise LedgerIntegrityError(
                        f"saving would drop charged releases of {cid!r} ({key[0]}); refusing")

    def save(self, path: str) -> None:
        """Write atomically; refuse if the file on disk holds anything this ledger lacks."""
        if os.path.exists(path):
            self._check_append_only(PrivacyLedger.load(path))
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.to_json_dict(), fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
