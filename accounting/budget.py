"""The budget guard: no release is made unless the ledger, with it, stays within the target.

Use per round::

    token = guard.reserve_round({cid: (step_event, local_steps), ...}, round_index=t)
    ledger.save(path)          # the charge is on disk before any noise exists
    ... clients train, server aggregates ...
    guard.commit(token)

A crash between ``reserve_round`` and ``commit`` leaves the reservation in the ledger, where it
counts as spent.
"""

from __future__ import annotations

import math

from accounting.accountants import FederationResult, federation_epsilon_of
from accounting.errors import AccountingError, BudgetExceededError
from accounting.events import ComposedDpEvent, DpEvent, SelfComposedDpEvent
from accounting.ledger import PrivacyLedger


class BudgetGuard:
    """Projects, reserves and commits releases against a target ε.

    Args:
        ledger: The run's ledger (modified in place by reserve/commit).
        target_epsilon: Budget; ``math.inf`` accepts everything (non-private runs).
        delta: δ at which ε is judged.
        accountant: ``"prv"``, ``"pld"`` or ``"rdp"``.
    """

    def __init__(self, ledger: PrivacyLedger, *, target_epsilon: float, delta: float,
                 accountant: str = "prv") -> None:
        if not target_epsilon > 0:
            raise AccountingError(f"target_epsilon={target_epsilon!r} must be > 0")
        self.ledger = ledger
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = accountant

    def project(self, events_by_client: dict[str, tuple[DpEvent, int]]) -> FederationResult:
        """Federation ε if these releases were added to the ledger."""
        histories = {}
        for cid in self.ledger.clients:
            history = self.ledger.client_event(cid)
            if cid in events_by_client:
                event, count = events_by_client[cid]
                history = ComposedDpEvent((history, SelfComposedDpEvent(event, count)))
            histories[cid] = history
        unknown = set(events_by_client) - set(self.ledger.clients)
        if unknown:
            raise AccountingError(f"unknown clients {sorted(unknown)}")
        return federation_epsilon_of(histories, delta=self.delta, accountant=self.accountant,
                                     unit=self.ledger.unit)

    def reserve_round(self, events_by_client: dict[str, tuple[DpEvent, int]], *,
                      round_index: int | None, kind: str = "dp-sgd") -> str:
        """Refuse (nothing written) if the target would be passed; otherwise reserve.

        Raises:
            BudgetExceededError: With the projected ε, the target and the worst client.
        """
        if math.isfinite(self.target_epsilon):
            projected = self.project(events_by_client)
            if projected.epsilon > self.target_epsilon:
                raise BudgetExceededError(
                    f"round {round_index if round_index is None else round_index + 1} would "
                    f"take ε to {projected.epsilon:.4g} (client {projected.worst_client!r}), "
                    f"above the target {self.target_epsilon}; stopped before releasing it",
                    projected_epsilon=projected.epsilon, target_epsilon=self.target_epsilon,
                    worst_client=projected.worst_client)
        return self.ledger.reserve(events_by_client, round_index=round_index, kind=kind)

    def commit(self, token: str) -> None:
        """The reserved releases happened."""
        self.ledger.commit(token)
