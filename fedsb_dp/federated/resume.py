"""What a run directory says about rounds that were charged but never completed.

The budget guard writes a round's charge to the ledger before any noise is drawn and commits it
after aggregation. A run that stops in between (killed, crashed, or a non-finite loss) leaves
the reservation pending: noise computed from that round's records may already have left a
client, so the charge stands for good. A resume re-runs the round from the last checkpoint,
which needs a second charge; σ was calibrated for exactly the planned rounds, so the guard
then stops on budget rather than pass the target. This is conservative by design, and the
run's summary says so with these helpers.
"""

from __future__ import annotations

from accounting.ledger import PrivacyLedger


def uncommitted_rounds(ledger: PrivacyLedger) -> list[int]:
    """1-based numbers of the rounds charged in ``ledger`` but never committed."""
    return sorted({r + 1 for r in ledger.pending_rounds if r is not None})


def uncommitted_note(ledger: PrivacyLedger, run_dir: str) -> str | None:
    """A summary message for a run with charged-but-uncommitted rounds (``None`` if none).

    Args:
        ledger: The run's ledger as it stands at the end of the call.
        run_dir: The run directory (named in the suggested commands).

    Returns:
        What happened, why it is charged, and how to go on.
    """
    rounds = uncommitted_rounds(ledger)
    if not rounds:
        return None
    listed = ", ".join(str(r) for r in rounds)
    return (
        f"round(s) {listed} were charged in the ledger but never completed (the run stopped "
        "inside them). The charge stands, since noise from them may have left a client, so "
        "this run's budget counts them as spent and a resume cannot re-run them within the "
        "target. To train further, start a fresh run in a new directory "
        f"(`fedsb-dp run --config SETTINGS.toml --out NEW_DIR`, same settings as "
        f"{run_dir}/config.json); it is a new release on the same records, so its ε adds to "
        f"this run's (`fedsb-dp account {run_dir}/ledger.json` gives this run's share)")
