"""Auditing a run and the toolkit's DP-SGD step (needs torch; the math is in ``accounting``).

* :mod:`accounting.audit` (torch-free): load a run or sweep directory, check its ledger,
  config and provenance, recompute ε with PRV/PLD/RDP, compare with the run's claim.
* :mod:`fedsb_dp.audit.step`: step-level many-run audit of the client's clip + noise step.
* :mod:`fedsb_dp.audit.one_run`: one-run audit (Steinke–Nasr–Jagielski) with canaries in
  R-space injected into a client's real training.
* :mod:`fedsb_dp.audit.command`: the ``fedsb-dp audit`` subcommand.

Names are imported lazily so that ``fedsb-dp --help`` does not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuditReport": "accounting.audit", "audit_run": "accounting.audit",
    "audit_sweep": "accounting.audit", "load_run": "accounting.audit",
    "OneRunAuditResult": "fedsb_dp.audit.one_run", "one_run_audit": "fedsb_dp.audit.one_run",
    "StepAuditResult": "fedsb_dp.audit.step", "epsilon_table": "fedsb_dp.audit.step",
    "real_step_matches": "fedsb_dp.audit.step", "step_audit": "fedsb_dp.audit.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsb_dp.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
