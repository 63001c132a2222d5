"""The benchmark's answer: does Fed-SB beat the private head alone and every adapter baseline?

An *experiment* is one training budget (dataset, clients, steps, batch, tokens, noise mode),
archived as one or more grids: a grid is often run in parts (the adapter methods first, the
head alone and the newer rivals later). :func:`read_experiment` reads every run of its grids
with ε recomputed from the run's own ledger; :func:`check_experiment` refuses an experiment in
which a run overshoots its target ε, a run is counted twice, or the methods of one comparison
ran at different budgets (the learning rate excepted: each method has its own tuned step).
:func:`answer_table` then gives, for every (experiment, partition, ε), Fed-SB's best rank
against the private head alone and against the most accurate adapter baseline, paired by seed
with a Student-t interval (:mod:`fedsb_dp.sweep.paired`): a verdict only where the interval
excludes 0. :func:`verdict_counts` sums the verdicts up, and :func:`answer_markdown` writes all
of it with each experiment's cell size next to its rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedsb_dp.errors import ConfigError
from fedsb_dp.sweep.paired import (
    AHEAD,
    BEHIND,
    HEAD_ONLY,
    TOO_FEW,
    UNDECIDED,
    by_seed,
    contenders,
    paired_difference,
)
from fedsb_dp.sweep.results import over_target, unfinished_cells, unfinished_reason

#: Settings every method compared within one experiment must share.
SHARED_BUDGET = ("dataset", "model", "num_clients", "participation", "noise", "batch_size",
                 "local_steps", "rounds", "max_length", "max_train_records", "max_eval_records",
                 "eval_sample", "max_grad_norm")
ANSWER_COLUMNS = ["experiment", "partition", "target_epsilon", "sigma", "fedsb", "head_only",
                  "best_baseline", "vs_head_only", "verdict_head_only", "vs_best_baseline",
                  "verdict_best_baseline"]


@dataclass(frozen=True)
class Experiment:
    """One training budget and the archived grids that hold its runs.

    Attributes:
        name: How the answer names it (``"Rotten Tomatoes, 10 clients"``).
        grids: Sweep or archive directories (each with ``cells/`` or run directories).
    """

    name: str
    grids: tuple[str, ...]


def read_experiment(experiment: Experiment):
    """Every finished run of the experiment's grids, ε recomputed from its ledger.

    Raises:
        ConfigError: If a grid is missing or holds no finished run, or the experiment fails
            :func:`check_experiment`.
    """
    import pandas as pd

    from fedsb_dp.sweep.results import collect_results

    frames = []
    for grid in experiment.grids:
        try:
            frames.append(collect_results(grid, write=False).assign(grid=grid))
        except ConfigError as exc:
            raise ConfigError(f"experiment {experiment.name!r}: {exc}") from None
    frame = pd.concat(frames, ignore_index=True)
    check_experiment(frame, experiment.name)
    return frame


def missing_cells(experiment: Experiment) -> list[dict[str, str]]:
    """The experiment's cells that were refused or failed, with the grid and reason of each.

    Their seeds are absent from every mean and pairing, so the answer has to name them (a
    Dirichlet draw that cannot give every client a batch is refused before any budget is
    spent, and the split it asked for is then simply not measured).
    """
    return [{"grid": grid, "run": cell["run"], "reason": unfinished_reason(cell)}
            for grid in experiment.grids for cell in unfinished_cells(grid)]


def check_experiment(frame, name: str) -> None:
    """Refuse an experiment whose runs cannot be compared or break their privacy target.

    Args:
        frame: Its runs (``read_experiment``; needs ``run``, ``epsilon``, ``target_epsilon``,
            ``partition`` and the :data:`SHARED_BUDGET` columns present).
        name: The experiment's name, for the message.

    Raises:
        ConfigError: Naming the runs over their target ε, the runs counted twice, or the
            (partition, ε) whose methods differ in a shared setting, with the values.
    """
    problems = []
    over = [f"{row.run} (ε = {row.epsilon:.6g} > {row.target_epsilon:g})"
            for row in over_target(frame).itertuples()]
    if over:
        problems.append(f"recomputed ε above the target: {', '.join(over)}")
    twice = sorted(set(frame["run"][frame["run"].duplicated()]))
    if twice:
        problems.append(f"run(s) {twice} appear in more than one grid")
    present = [c for c in SHARED_BUDGET if c in frame.columns]
    for (partition, eps), group in frame.groupby(["partition", "target_epsilon"], sort=True):
        for column in present:
            values = group[column].astype(object).where(group[column].notna(), None)
            if values.nunique(dropna=False) > 1:
                seen = ", ".join(f"{m}: {sorted({str(v) for v in vals})}" for m, vals in
                                 values.groupby(group["method"]))
                problems.append(f"{partition} at ε = {eps:g}: {column} differs ({seen})")
    if problems:
        raise ConfigError(f"experiment {name!r} cannot be answered: " + "; ".join(problems))


def _mean_std(values: Mapping[int, float]) -> str:
    accuracies = list(values.values())
    if len(accuracies) < 2:
        return f"{accuracies[0]:.3f} (1)"
    return (f"{statistics.mean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f} "
            f"({len(accuracies)})")


def _label(method: str, rank: int) -> str:
    return HEAD_ONLY if method == HEAD_ONLY else f"{method} r={rank}"


def answer_table(frames: Mapping[str, Any], *, confidence: float = 0.95):
    """Fed-SB against the head alone and the best adapter baseline, per experiment cell.

    Args:
        frames: Experiment name → its runs (``read_experiment``).
        confidence: Coverage of the paired intervals.

    Returns:
        A DataFrame with :data:`ANSWER_COLUMNS`, one row per (experiment, partition, ε) with a
        Fed-SB run. Accuracies read ``mean ± std (seeds)``; a difference reads ``mean [low,
        high] (n=paired seeds)`` in accuracy points; a missing rival leaves its cells empty.
    """
    import pandas as pd

    from fedsb_dp.sweep.report import partition_key

    rows = []
    for name, frame in frames.items():
        frame = frame[frame["test_accuracy"].notna()]
        cells = sorted(frame.groupby(["partition", "target_epsilon"]),
                       key=lambda item: (partition_key(item[0][0]), item[0][1]))
        for (partition, eps), group in cells:
            ours, head, baseline = contenders(group)
            if ours is None:
                continue
            mine = by_seed(group, *ours)
            fedsb_runs = group[group["method"] == "fedsb"]
            row = {"experiment": name, "partition": partition, "target_epsilon": eps,
                   "sigma": (float(fedsb_runs["noise_multiplier"].mean())
                             if math.isfinite(eps) else 0.0),
                   "fedsb": f"{_label(*ours)}: {_mean_std(mine)}"}
            for key, rival in (("head_only", head), ("best_baseline", baseline)):
                row[key] = row[f"vs_{key}"] = row[f"verdict_{key}"] = ""
                if rival is None:
                    continue
                theirs = by_seed(group, *rival)
                row[key] = (_mean_std(theirs) if key == "head_only"
                            else f"{_label(*rival)}: {_mean_std(theirs)}")
                if set(mine) & set(theirs):
                    result = paired_difference(mine, theirs, confidence=confidence)
                    row[f"vs_{key}"], row[f"verdict_{key}"] = result.describe(), result.verdict
            rows.append(row)
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS)


def verdict_counts(table) -> dict[str, dict[str, int]]:
    """How many private cells (finite ε) end in each verdict, per rival.

    Returns:
        ``{"head_only": {verdict: count}, "best_baseline": {...}}`` over
        :data:`~fedsb_dp.sweep.paired.AHEAD`, ``BEHIND``, ``UNDECIDED`` and ``TOO_FEW``.
    """
    private = table[table["target_epsilon"].map(math.isfinite)]
    counts = {}
    for key in ("head_only", "best_baseline"):
        verdicts = private[f"verdict_{key}"]
        counts[key] = {v: int((verdicts == v).sum()) for v in (AHEAD, BEHIND, UNDECIDED,
                                                                TOO_FEW)}
    return counts


def cell_size(frame) -> str:
    """An experiment's budget in words: records, clients, rounds × steps × batch, tokens."""
    first = frame.iloc[0]
    cap = first["max_train_records"]
    records = ("all training records" if cap is None or cap != cap
               else f"{int(cap):,} training records")
    participation = float(first["participation"])
    share = "" if participation >= 1 else f" ({participation:.2g} per round)"
    return (f"{first['dataset']}, {records} over {int(first['num_clients'])} clients{share}; "
            f"{int(first['rounds'])} rounds × {int(first['local_steps'])} local steps × "
            f"expected batch {int(first['batch_size'])}, {int(first['max_length'])} tokens, "
            f"{first['noise']} σ, {int(first['max_eval_records'])} test records "
            f"({first['eval_sample']} sample)")


def _fmt_eps(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def answer_markdown(table, frames: Mapping[str, Any], experiments: Sequence[Experiment],
                    missing: Mapping[str, Sequence[Mapping[str, str]]] | None = None) -> str:
    """The answer as Markdown: the verdict counts, each experiment's cell size, the table.

    Args:
        table: :func:`answer_table`'s rows.
        frames: Each experiment's runs (:func:`read_experiment`), by name.
        experiments: The experiments, in the order to list them.
        missing: Each experiment's :func:`missing_cells`, by name; listed, by reason, after
            the table.
    """
    counts = verdict_counts(table)
    runs = sum(len(f) for f in frames.values())
    lines = [
        "# Does Fed-SB beat the private head alone and every adapter baseline?", "",
        f"{runs} runs in {len(experiments)} experiments; every ε recomputed from its run's "
        "ledger (PRV upper bound, max over clients) and none above its target. Differences "
        "in accuracy points, Fed-SB's best rank minus the rival, paired by seed, with a 95 % "
        "Student-t interval; a verdict only where the interval excludes 0. The best baseline "
        "is picked on the same test accuracies (which favours it).", "",
        "Private cells (ε < ∞):", ""]
    for key, title in (("head_only", "the private head alone"),
                       ("best_baseline", "the best adapter baseline")):
        c = counts[key]
        lines.append(f"- against {title}: Fed-SB ahead in {c[AHEAD]}, behind in {c[BEHIND]}, "
                     f"not distinguishable in {c[UNDECIDED]}"
                     + (f", one seed only in {c[TOO_FEW]}" if c[TOO_FEW] else "") + ".")
    lines += ["", "## Experiments", ""]
    for experiment in experiments:
        frame = frames[experiment.name]
        lines.append(f"- **{experiment.name}**: {cell_size(frame)}; grids "
                     + ", ".join(f"`{g}`" for g in experiment.grids))
    header = ["experiment", "partition", "ε", "σ", "Fed-SB", "head-only", "best baseline",
              "Fed-SB − head-only", "verdict", "Fed-SB − best baseline", "verdict"]
    lines += ["", "## Paired differences", "", "| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    for row in table.itertuples():
        cells = [row.experiment, row.partition, _fmt_eps(row.target_epsilon),
                 f"{row.sigma:.3f}" if math.isfinite(row.target_epsilon) else "—",
                 row.fedsb, row.head_only, row.best_baseline,
                 row.vs_head_only, row.verdict_head_only,
                 row.vs_best_baseline, row.verdict_best_baseline]
        lines.append("| " + " | ".join(cells) + " |")
    if missing and any(missing.values()):
        lines += ["", "## Cells that did not run", "",
                  "Their seeds are in no mean and no pairing above.", ""]
        for experiment in experiments:
            by_reason: dict[str, list[str]] = {}
            for cell in missing.get(experiment.name, ()):
                by_reason.setdefault(cell["reason"], []).append(cell["run"])
            for reason, runs in by_reason.items():
                lines.append(f"- **{experiment.name}**, {len(runs)} cell"
                             f"{'s' if len(runs) > 1 else ''} ({', '.join(f'`{r}`' for r in runs)})"
                             f": {reason}")
    return "\n".join(lines) + "\n"
