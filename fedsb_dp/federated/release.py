"""What a run releases, what stays with its operator, and who is trusted with what.

A run directory holds two kinds of files. **Released** files are meant to be published with
the model and are what ``fedsb-dp archive`` keeps: ``config.json``, ``ledger.json``,
``metrics.jsonl``, ``provenance.json`` and ``summary.json`` (and the final adapter). Nothing in
them may depend on private data except through a release the ledger charges for.
**Operator-only** files stay on the machine that ran the federation: ``operator.jsonl``
(timings, realised cohorts, per-client traffic, stop details), ``partition.json`` (exact
per-client label counts), ``data.json`` (a digest of the private rows), ``progress.json`` and
the checkpoints.

What must stay with the operator depends on the privacy unit:

* Timings (``elapsed_s``, ``round_time_s``, ``wall_time_s``) always: they grow with the
  realised Poisson batch sizes, which are secret in the record-level analysis.
* Client-level DP takes amplification by Poisson cohort sampling, so the analysis assumes
  the cohort of each round is secret. Every field that reveals it — the participant list,
  per-client traffic, realised traffic totals (cohort size × payload) — and every client's
  record count Nᵢ leave the released files; the summary reports traffic as its expected value
  p·Σᵢ(payload of client i) per round, which depends on no private bit.
* Per-client noise σᵢ (``--noise per-client``, record-level only) is a function of Nᵢ and the
  public settings, so it is released wherever Nᵢ is (the ledger, the summary) and would be
  operator-only wherever Nᵢ is (``noise_multipliers`` is listed with the cohort fields).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fedsb_dp.federated import run_dir as rd

#: Always operator-only: they depend on realised batch sizes.
TIMING_FIELDS = ("elapsed_s", "round_time_s", "round_times_s", "wall_time_s")
#: Operator-only under client-level DP: they reveal the secret cohort or a client's Nᵢ.
COHORT_FIELDS = ("participants", "valid", "dropped", "rejected", "bytes_up_by_client",
                 "bytes_down_by_client", "bytes_up", "bytes_down", "clients",
                 "noise_multipliers")

#: The stop reason a released file gives for a non-finite update; details go to the operator.
NONFINITE_STOP_MESSAGE = (
    "a noised update became non-finite (NaN/inf), so the round was discarded; the ledger keeps "
    "its reserved steps and the final model is the last completed round's. Lower --lr or "
    "--clip and start a new run (details in the operator-only file operator.jsonl)")


def operator_only_fields(dp_level: str) -> tuple[str, ...]:
    """Fields that must not appear in a released file for this privacy unit.

    Args:
        dp_level: ``"example"`` (record-level) or ``"client"``.

    Returns:
        The field names kept out of ``metrics.jsonl`` and ``summary.json``.
    """
    return TIMING_FIELDS + (COHORT_FIELDS if dp_level == "client" else ())


def split_record(record: Mapping[str, Any], *,
                 dp_level: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a record into its releasable part and its operator-only part.

    Args:
        record: A metrics line or a summary.
        dp_level: The run's privacy unit.

    Returns:
        ``(released, operator)``; every key of ``record`` is in exactly one of them.
    """
    hidden = operator_only_fields(dp_level)
    released = {k: v for k, v in record.items() if k not in hidden}
    operator = {k: v for k, v in record.items() if k in hidden}
    return released, operator


def append_operator(run_directory: str, kind: str, record: Mapping[str, Any]) -> None:
    """Append one line to the run's operator-only log ``operator.jsonl``.

    Args:
        run_directory: The run directory.
        kind: What the line is (``"round"``, ``"summary"``, ``"stop"``).
        record: Its fields.
    """
    rd.append_jsonl(os.path.join(run_directory, rd.OPERATOR), {"kind": kind, **record})


def write_round(run_directory: str, record: Mapping[str, Any], *,
                dp_level: str) -> dict[str, Any]:
    """Write one round: its releasable fields to ``metrics.jsonl``, the rest to the operator.

    Args:
        run_directory: The run directory.
        record: Everything known about the round (must hold ``round``).
        dp_level: The run's privacy unit.

    Returns:
        The released part, as written to ``metrics.jsonl`` (all a console may show).
    """
    released, operator = split_record(record, dp_level=dp_level)
    rd.append_jsonl(os.path.join(run_directory, rd.METRICS), released)
    append_operator(run_directory, "round", {"round": record["round"], **operator})
    return released


def expected_traffic(payload_by_client: Mapping[str, int], *, participation: float,
                     rounds: int) -> int:
    """Bytes one direction carries in expectation: p · Σᵢ payloadᵢ per round.

    Depends only on public settings (payload sizes follow from the ranks), never on which
    clients the secret Poisson cohorts held.

    Args:
        payload_by_client: Bytes one round's message to or from each client takes.
        participation: The Poisson cohort rate p.
        rounds: Rounds run.

    Returns:
        The expected total, rounded to whole bytes.
    """
    return round(participation * sum(payload_by_client.values()) * rounds)


def trust_model(dp_level: str, *, engine: str) -> dict[str, str]:
    """Who is trusted with what in a run: written to ``summary.json`` as ``trust_model``.

    Args:
        dp_level: ``"example"`` (record-level) or ``"client"``.
        engine: ``"inprocess"`` or ``"flower"``.

    Returns:
        Plain-language fields: ``privacy_unit``, ``trusted``, ``adversary``, ``released``.
    """
    if dp_level == "client":
        return {
            "privacy_unit": "one client's whole dataset",
            "trusted": "the server: it receives every participant's raw, un-noised update "
                       "ΔRᵢ and adds the noise itself",
            "adversary": "whoever sees what the server publishes (the model, metrics.jsonl, "
                         "summary.json); not the server",
            "released": "the noised R̄ of every round and the final model; per-round cohorts, "
                        "per-client traffic and Nᵢ stay operator-only (the accounting takes "
                        "amplification by Poisson cohort sampling)",
        }
    if engine == "flower":
        who = ("nobody with raw data: each node clips and noises its update on its own "
               "machine before it leaves")
    else:
        who = ("the process running the simulation (it holds every client's data); each "
               "client's update is noised before the server step reads it")
    return {
        "privacy_unit": "one record of one client",
        "trusted": who,
        "adversary": "the server, the other clients and anyone who sees the published files",
        "released": "every client's noised R (and head) each round, R̄, the final model, "
                    "participants and Nᵢ (treated as public)",
    }
