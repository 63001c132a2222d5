"""Typed errors of the accounting package; each names the bad value and the valid range."""

from __future__ import annotations


class AccountingError(ValueError):
    """Bad input to an accounting function (out-of-range value, unknown name, …)."""


class LedgerIntegrityError(AccountingError):
    """A ledger file is truncated, edited, of an unknown schema or holds an unknown type."""


class DeltaPolicyError(AccountingError):
    """δ is not below 1/N_total and the override was not given."""


class BudgetExceededError(RuntimeError):
    """The next release would take ε past the target; nothing was recorded.

    Attributes:
        projected_epsilon: ε the federation would have after the release.
        target_epsilon: The budget.
        worst_client: The client whose ε would exceed it.
    """

    def __init__(self, message: str, *, projected_epsilon: float, target_epsilon: float,
                 worst_client: str | None) -> None:
        super().__init__(message)
        self.projected_epsilon = projected_epsilon
        self.target_epsilon = target_epsilon
        self.worst_client = worst_client
