"""Console hygiene shared by the CLI and the benchmark scripts."""

from __future__ import annotations

import logging
import warnings


def quiet_expected_warnings(*, transformers_reports: bool = True) -> None:
    """Silence warnings that are expected in every run and say nothing actionable.

    dp_accounting's RDP accountant logs every order it skips at small σ (calibration probes
    those; the skipped orders only loosen that cross-check), and torch notes that full backward
    hooks see module outputs only when no layer input requires grad — which is all Opacus'
    Linear grad sampler reads in an adapter-only model. transformers prints a load report for
    every classifier built on an encoder checkpoint (the new head is "MISSING" by design);
    ``transformers_reports=False`` keeps it (``fedsb-dp --verbose``).
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if transformers_reports:
        import transformers

        transformers.logging.set_verbosity_error()
