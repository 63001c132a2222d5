"""Torch-free privacy accounting for federated DP: events, ledger, accountants, calibration.

Imports neither torch nor ``fedsb_dp``, so an auditor can install and test it on its own.
"""

from accounting.accountants import (
    ACCOUNTANTS,
    EpsilonResult,
    FederationResult,
    compute_delta,
    compute_epsilon,
    federation_epsilon,
    federation_epsilon_of,
)
from accounting.budget import BudgetGuard
from accounting.calibration import (
    CalibrationResult,
    FederatedPlan,
    calibrate,
    calibrate_noise_multiplier,
    calibrate_per_client,
    epsilon_for_plan,
    max_rounds_within_budget,
)
from accounting.delta import check_delta, default_delta
from accounting.errors import (
    AccountingError,
    BudgetExceededError,
    DeltaPolicyError,
    LedgerIntegrityError,
)
from accounting.events import (
    ComposedDpEvent,
    DpEvent,
    GaussianDpEvent,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    SampledWithoutReplacementDpEvent,
    SelfComposedDpEvent,
    event_from_dict,
)
from accounting.ledger import PrivacyLedger
from accounting.plan import RecordedPlan

__all__ = [
    "ACCOUNTANTS", "AccountingError", "BudgetExceededError", "BudgetGuard", "CalibrationResult",
    "ComposedDpEvent", "DeltaPolicyError", "DpEvent", "EpsilonResult", "FederatedPlan",
    "FederationResult", "GaussianDpEvent", "LedgerIntegrityError", "NoOpDpEvent",
    "NonPrivateDpEvent", "PoissonSampledDpEvent", "PrivacyLedger", "RecordedPlan",
    "SampledWithoutReplacementDpEvent", "SelfComposedDpEvent", "calibrate",
    "calibrate_noise_multiplier", "calibrate_per_client", "check_delta", "compute_delta",
    "compute_epsilon", "default_delta", "epsilon_for_plan", "event_from_dict", "federation_epsilon",
    "federation_epsilon_of", "max_rounds_within_budget",
]
