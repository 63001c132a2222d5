"""Sweep reports: ``report.md`` and a self-contained ``report.html`` with PNG plots.

Every ε shown comes from :func:`fedsb_dp.sweep.results.collect_results`, which recomputes it
from each cell's ledger; nothing is copied from the runs' own summaries.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.partition import PartitionSpec
from fedsb_dp.sweep.paired import HEAD_ONLY, paired_difference, paired_table
from fedsb_dp.sweep.results import (
    RESULTS_FILE,
    ROW_ORDER,
    collect_results,
    over_target,
    unfinished_cells,
    unfinished_reason,
)

PLOTS = ("accuracy_vs_epsilon.png", "accuracy_vs_bytes.png", "noise_scale.png")


def aggregate(frame):
    """Mean ± std over seeds per (partition, method, rank, target ε)."""
    grouped = frame.groupby(["partition", "method", "rank", "target_epsilon"], sort=True)
    out = grouped.agg(
        accuracy_mean=("test_accuracy", "mean"), accuracy_std=("test_accuracy", "std"),
        macro_f1_mean=("test_macro_f1", "mean"), epsilon_max=("epsilon", "max"),
        noise_multiplier=("noise_multiplier", "mean"),
        noise_norm_per_step=("noise_norm_per_step", "mean"),
        trainable_parameters=("trainable_parameters", "first"),
        bytes_total=("bytes_total", "mean"), seeds=("seed", "count"),
    ).reset_index()
    out["accuracy_std"] = out["accuracy_std"].fillna(0.0)
    return out


#: What makes two grids different experiments even at the same partition and ε.
SETUP_COLUMNS = ("dataset", "num_clients")
#: Joins a partition to its setup in a row label: ``iid · 10 clients``.
SETUP_SEPARATOR = " · "


def distinguish_setups(frame):
    """Label each run's partition with its dataset and client count where those vary.

    Grids merged into one report (3 and 10 clients, Rotten Tomatoes and 20 Newsgroups) are
    different experiments at the same partition and ε: without this their runs would be
    averaged into one row and compared across setups. Only the settings that vary are named,
    so a single grid's labels are left as they are.

    Args:
        frame: Per-run results (a copy is returned; the input is not modified).

    Returns:
        The frame with ``partition`` relabelled, e.g. ``iid · 20newsgroups · 10 clients``.
    """
    frame = frame.copy()
    varying = [c for c in SETUP_COLUMNS
               if c in frame.columns and frame[c].nunique(dropna=False) > 1]
    if not varying:
        return frame

    def label(row) -> str:
        parts = [str(row["partition"])]
        for column in varying:
            value = row[column]
            if column == "num_clients":
                parts.append("? clients" if value != value else f"{int(value)} clients")
            else:
                parts.append("default dataset" if value != value else str(value))
        return SETUP_SEPARATOR.join(parts)

    frame["partition"] = frame.apply(label, axis=1)
    return frame


#: Settings that must agree among the seeds averaged into one row (else the row mixes runs).
BUDGET_COLUMNS = ("learning_rate", "batch_size", "local_steps", "rounds", "init", "num_clients",
                  "model", "dataset", "max_length", "max_train_records", "max_grad_norm",
                  "max_eval_records", "eval_sample")


def mixed_settings(frame) -> list[str]:
    """Rows of :func:`aggregate` whose runs differ in a training setting, described."""
    found = []
    keys = ["partition", "method", "rank", "target_epsilon"]
    present = [c for c in BUDGET_COLUMNS if c in frame.columns]
    for key, group in frame.groupby(keys, sort=True):
        differing = [c for c in present if group[c].nunique(dropna=False) > 1]
        if differing:
            found.append(f"{dict(zip(keys, key, strict=True))}: {differing} differ")
    return found


def _paired(frame, partition, eps, ours, theirs) -> str:
    """Per-seed accuracy gaps (points) of ``ours`` over ``theirs`` on the seeds both ran.

    The seed fixes the client split, so on a skewed partition the unpaired std mostly measures
    how hard each split is; the paired gaps show whether the ordering holds split by split.
    """
    def by_seed(row):
        cell = frame[(frame["partition"] == partition) & (frame["target_epsilon"] == eps)
                     & (frame["method"] == row["method"]) & (frame["rank"] == row["rank"])]
        return cell.groupby("seed")["test_accuracy"].mean()

    mine, rival = by_seed(ours), by_seed(theirs)
    seeds = sorted(set(mine.index) & set(rival.index))
    if not seeds:
        return "no shared seed"
    gaps = [100 * (mine[s] - rival[s]) for s in seeds]
    ahead = sum(g >= 0 for g in gaps)
    return (f"{ahead}/{len(gaps)} seeds ≥ 0: "
            + ", ".join(f"{g:+.2f}" for g in gaps))


def _paired_verdict(frame, partition, eps, ours, theirs) -> str:
    def by_seed(row):
        cell = frame[(frame["partition"] == partition) & (frame["target_epsilon"] == eps)
                     & (frame["method"] == row["method"]) & (frame["rank"] == row["rank"])]
        return cell.groupby("seed")["test_accuracy"].mean().to_dict()

    mine, rival = by_seed(ours), by_seed(theirs)
    if not set(mine) & set(rival):
        return "no shared seed"
    return paired_difference(mine, rival).verdict


def comparison(summary, frame=None):
    """Fed-SB (best rank) against the best baseline per partition and ε.

    With the per-run ``frame`` the verdict comes from the paired 95 % t interval of the
    per-seed gaps (:mod:`fedsb_dp.sweep.paired`): "not distinguishable" when it contains 0,
    and a ``paired_gaps`` column lists the gap seed by seed (the same seed means the same
    client split). Without it, a difference within the larger of the two seed standard
    deviations is called a tie. With a single seed on either side there is no spread, and no
    verdict is given. The head-only baseline is not a rival here (see :func:`paired_table`).

    Args:
        summary: The output of :func:`aggregate`.
        frame: The per-run results that ``summary`` aggregates, for the paired column.

    Returns:
        A DataFrame with one row per (partition, target ε) that has Fed-SB and a baseline.
    """
    import pandas as pd

    rows = []
    federated = summary[~summary["method"].str.startswith("central")]
    for (partition, eps), group in sorted(
            federated.groupby(["partition", "target_epsilon"], sort=True),
            key=lambda item: (partition_key(item[0][0]), item[0][1])):
        ours = group[group["method"] == "fedsb"]
        # The head alone is a reference, not an adapter baseline (see paired_table).
        theirs = group[~group["method"].isin(["fedsb", HEAD_ONLY])]
        if ours.empty or theirs.empty:
            continue
        best = ours.loc[ours["accuracy_mean"].idxmax()]
        rival = theirs.loc[theirs["accuracy_mean"].idxmax()]
        gap = best["accuracy_mean"] - rival["accuracy_mean"]
        spread = max(best["accuracy_std"], rival["accuracy_std"])
        if min(best["seeds"], rival["seeds"]) < 2:
            verdict = "one seed: no spread to judge by"  # a gap of 1 record is not a win
        elif frame is not None:  # paired by seed: no verdict unless the 95 % t-CI excludes 0
            verdict = _paired_verdict(frame, partition, eps, best, rival)
        else:
            verdict = "tie" if abs(gap) <= spread else ("Fed-SB ahead" if gap > 0 else
                                                        "Fed-SB behind")
        rows.append({
            "partition": partition, "target_epsilon": eps,
            "fedsb": f"r={best['rank']}: {best['accuracy_mean']:.4f} ± {best['accuracy_std']:.4f}",
            "best_baseline": f"{rival['method']} r={rival['rank']}: "
                             f"{rival['accuracy_mean']:.4f} ± {rival['accuracy_std']:.4f}",
            "gap_points": round(100 * gap, 2), "verdict": verdict,
            "bytes_ratio": round(rival["bytes_total"] / best["bytes_total"], 2),
            **({"paired_gaps": _paired(frame, partition, eps, best, rival)}
               if frame is not None else {}),
        })
    columns = COMPARISON_COLUMNS + (["paired_gaps"] if frame is not None else [])
    return pd.DataFrame(rows, columns=columns)


COMPARISON_COLUMNS = ["partition", "target_epsilon", "fedsb", "best_baseline", "gap_points",
                      "verdict", "bytes_ratio"]


def _eps_positions(values):
    finite = sorted(v for v in values if math.isfinite(v))
    top = (max(finite) * 2.0) if finite else 1.0
    return {v: (v if math.isfinite(v) else top) for v in values}, top


def _plots(summary, directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # One colour and marker per method, line style and marker size by rank, so that nine
    # method-rank lines stay readable.
    palette = plt.get_cmap("tab10").colors
    markers = "osD^v<>ph*"
    styles = {m: (palette[i % len(palette)], markers[i % len(markers)])
              for i, m in enumerate(sorted(summary["method"].unique(), key=_method_key))}
    ranks = sorted(summary["rank"].unique())
    dashes = ["-", "--", ":", "-."]
    rank_lines = {r: dashes[i % len(dashes)] for i, r in enumerate(ranks)}
    rank_sizes = {r: 12 * i for i, r in enumerate(ranks)}
    partitions = sorted(summary["partition"].unique(), key=partition_key)
    positions, _ = _eps_positions(summary["target_epsilon"].unique())
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.2),
                             squeeze=False)
    for ax, partition in zip(axes[0], partitions, strict=True):
        part = summary[summary["partition"] == partition]
        for (method, rank), group in _method_rank_groups(part):
            group = group.sort_values("target_epsilon")
            ax.errorbar([positions[e] for e in group["target_epsilon"]], group["accuracy_mean"],
                        yerr=group["accuracy_std"], marker=styles[method][1], capsize=3,
                        color=styles[method][0], linestyle=rank_lines[rank],
                        label=f"{method} r={rank}")
        ax.set_xscale("log")
        ticks = sorted(positions.items(), key=lambda item: item[1])
        ax.set_xticks([x for _, x in ticks],
                      [f"{e:g}" if math.isfinite(e) else "∞" for e, _ in ticks])
        ax.minorticks_off()
        ax.set_xlabel("target ε (∞ = non-private)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"partition: {partition}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)  # each panel lists its own lines (partitions may differ)
    fig.tight_layout()
    paths.append(os.path.join(directory, PLOTS[0]))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # A Pareto front only compares like with like: one panel per partition and target ε.
    panels = sorted(summary[["partition", "target_epsilon"]].drop_duplicates()
                    .itertuples(index=False, name=None),
                    key=lambda panel: (partition_key(panel[0]), panel[1]))
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (partition, eps) in zip(axes.flat, panels, strict=False):
        panel = summary[(summary["partition"] == partition)
                        & (summary["target_epsilon"] == eps)]
        for (method, rank), group in _method_rank_groups(panel):
            ax.scatter(group["bytes_total"], group["accuracy_mean"], color=styles[method][0],
                       marker=styles[method][1], s=20 + rank_sizes[rank],
                       label=f"{method} r={rank}")
        best, xs, ys = -1.0, [], []
        for row in panel.sort_values("bytes_total").itertuples():
            if row.accuracy_mean > best:
                best = row.accuracy_mean
                xs.append(row.bytes_total)
                ys.append(row.accuracy_mean)
        ax.step(xs, ys, where="post", color="black", alpha=0.4)
        ax.set_xscale("log")
        ax.set_title(f"{partition}, ε = {_fmt(float(eps))}", fontsize=9)
        ax.set_xlabel("bytes per run (setup + up + down)", fontsize=8)
        ax.set_ylabel("test accuracy (mean)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(directory, PLOTS[1]))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    private = summary[summary["target_epsilon"].apply(math.isfinite)]
    # σ depends on each client's sampling rate, so skewed splits change it: show one partition
    # (IID when swept) rather than mixing them.
    shown = min(private["partition"].unique(), key=partition_key) if len(private) else None
    private = private[private["partition"] == shown]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if len(private):
        pairs = private[["method", "rank"]].drop_duplicates().itertuples(index=False)
        labels = [f"{m} r={r}" for m, r in sorted(pairs, key=_pair_key)]
        epsilons = sorted(private["target_epsilon"].unique())
        width = 0.8 / max(len(epsilons), 1)
        for i, eps in enumerate(epsilons):
            sub = private[private["target_epsilon"] == eps].drop_duplicates(["method", "rank"])
            lookup = {f"{r.method} r={r.rank}": r.noise_norm_per_step for r in sub.itertuples()}
            ax.bar([j + i * width for j in range(len(labels))],
                   [lookup.get(label, 0.0) for label in labels], width, label=f"ε={eps:g}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=30,
                      ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"partition: {shown}", fontsize=9)
    ax.set_ylabel("expected noise norm per step σ·C·√d")
    fig.tight_layout()
    paths.append(os.path.join(directory, PLOTS[2]))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    return str(value)


def markdown_table(frame, columns: list[str]) -> str:
    """A GitHub-markdown table of the given columns."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame[columns].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _html_table(frame, columns: list[str]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame[columns].itertuples(index=False))
    return ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
            + rows + "</table>")


#: Column order of the accuracy grid: Fed-SB first, then the baselines, as in the paper.
METHOD_ORDER = ("fedsb", "ffa-lora", "fedit", "fedex-lora", "flora", "fedsvd", "rolora",
                "head-only")


def _method_key(method: str) -> tuple[int, str]:
    """Sort key: Fed-SB, then the baselines in paper order, then anything else by name."""
    known = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return known, method


def partition_key(partition: str) -> tuple[Any, ...]:
    """Sort key of a partition (or a :func:`distinguish_setups` label) in paper order.

    IID first, then Dirichlet, then label-mix Dirichlet, each by decreasing α (more skewed
    later), then quantity skew by decreasing β, then anything else (e.g. ``pooled``) by name;
    within a partition, setups in natural order (3 clients before 10).
    """
    kind, *setup = partition.split(SETUP_SEPARATOR)
    natural = tuple(tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                          for t in re.split(r"(\d+)", part) if t) for part in setup)
    try:
        spec = PartitionSpec.parse(kind)
    except ConfigError:
        return 4, 0.0, natural, partition
    rank = {"iid": 0, "dirichlet": 1, "labelmix": 2, "quantity": 3}.get(spec.kind, 4)
    return rank, -(spec.concentration or 0.0), natural, partition


def _pair_key(pair: tuple[str, int]) -> tuple[int, str, int]:
    """Sort key of a (method, rank) pair: method order, then rank."""
    return (*_method_key(pair[0]), pair[1])


def _method_rank_groups(frame):
    """``frame`` grouped by (method, rank), in :func:`_pair_key` order."""
    return sorted(frame.groupby(["method", "rank"]), key=lambda item: _pair_key(item[0]))


def accuracy_grid(summary):
    """Test accuracy as a grid: one row per (partition, ε), one column per method and rank.

    Cells read ``mean ± std (seeds)``; an empty cell was not run. ``σ`` is the row's largest
    noise multiplier (a mean over seeds): it depends on ε, δ, q and the step count, not on the
    method, but on a skewed partition each seed's split gives its smallest client its own q.

    Args:
        summary: The output of :func:`aggregate`.

    Returns:
        A DataFrame of strings, ready for :func:`markdown_table`.
    """
    import pandas as pd

    keys = sorted({(m, int(r)) for m, r in zip(summary["method"], summary["rank"],
                                                strict=True)}, key=_pair_key)
    rows = []
    groups = sorted(summary.groupby(["partition", "target_epsilon"], sort=True),
                    key=lambda item: (partition_key(item[0][0]), item[0][1]))
    for (partition, eps), group in groups:
        row = {"partition": partition, "ε": _fmt(float(eps))}
        for method, rank in keys:
            hit = group[(group["method"] == method) & (group["rank"] == rank)]
            row[f"{method} r={rank}"] = "" if hit.empty else (
                f"{hit['accuracy_mean'].iloc[0]:.3f} ± {hit['accuracy_std'].iloc[0]:.3f} "
                f"({int(hit['seeds'].iloc[0])})")
        row["σ"] = f"{group['noise_multiplier'].max():.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


COLUMNS = ["partition", "method", "rank", "target_epsilon", "epsilon_max", "accuracy_mean",
           "accuracy_std", "macro_f1_mean", "noise_multiplier", "trainable_parameters",
           "noise_norm_per_step", "bytes_total", "seeds"]


def _gather(path: str, merge: Sequence[str]):
    """The rows of ``path`` (ε recomputed now) and of the merged results files."""
    import pandas as pd

    from fedsb_dp.sweep.archive import read_merged_results

    frame = collect_results(path, write=False)
    frame["source"] = "ledger"
    if not merge:
        return frame
    frames = [frame, *(read_merged_results(m) for m in merge)]
    combined = pd.concat(frames, ignore_index=True)
    twice = combined["run"][combined["run"].duplicated()]
    if len(twice):
        raise ConfigError(f"run(s) {sorted(set(twice))} appear in more than one source; "
                          "a report counts each run once")
    return combined.sort_values(ROW_ORDER, kind="stable").reset_index(drop=True)


PAIRED_NOTE = (
    "Per (dataset, clients, partition, ε): the best Fed-SB rank minus head-only, and minus "
    "the most accurate adapter baseline, paired by seed (a seed fixes the split and the "
    "noise). difference = mean [95 % Student-t interval] (n paired seeds); the verdict is "
    "'not distinguishable' whenever the interval contains 0. The best rank and the best "
    "baseline are picked on the same test accuracies, which favours them.")


def write_report(path: str, merge: Sequence[str] = ()) -> dict[str, str]:
    """Regenerate results.csv, the plots, report.md and report.html for ``path``.

    Args:
        path: A sweep directory or a directory of run directories (or one run, or an archive
            from :func:`fedsb_dp.sweep.archive.archive_runs`).
        merge: Earlier results.csv files whose rows join the report as written (their runs'
            directories are gone); the report counts them apart from the rows it recomputed.

    Returns:
        Output name → file path.

    Raises:
        ConfigError: If a run appears twice among ``path`` and ``merge``.
    """
    frame = _gather(path, merge)
    frame.to_csv(os.path.join(path, RESULTS_FILE), index=False)
    frame = distinguish_setups(frame)  # after the CSV, which keeps the plain partition
    recomputed = int((frame["source"] == "ledger").sum())
    provenance = (f"{recomputed} runs' ε recomputed from their ledgers for this report"
                  + "".join(f"; {n} rows from {name}, whose ε was recomputed when that file "
                            f"was written" for name, n in
                            frame[frame["source"] != "ledger"]["source"].value_counts(
                                sort=False).items()))
    summary = aggregate(frame)
    plots = _plots(summary, path)
    table = markdown_table(summary, COLUMNS)
    grid = accuracy_grid(summary)
    versus = comparison(summary, frame)
    versus_columns = list(versus.columns)
    paired = paired_table(frame)
    mixed = mixed_settings(frame)
    over = over_target(frame)
    missing = unfinished_cells(path)
    reasons = [(c["run"], unfinished_reason(c)) for c in missing]
    md = [
        "# Privacy-utility report", "",
        f"{len(frame)} runs; ε is recomputed from every run's ledger (max over clients, "
        "PRV upper bound by default); accuracy is mean ± std over seeds.", "",
        f"Sources: {provenance}.", "",
        f"Runs whose recomputed ε exceeds the target: {len(over)}.", "",
        *([f"**Warning: rows averaging runs with different training settings:** "
           f"{'; '.join(mixed)}", ""] if mixed else []),
        *([f"**Cells that did not run ({len(missing)})**: their seeds are missing from the "
           "means and from every paired comparison.", "",
           *[f"- `{run}`: {reason}" for run, reason in reasons], ""]
          if missing else []),
        "## Test accuracy", "",
        "Mean ± std over seeds (number of seeds); σ: the row's largest noise multiplier, a mean "
        "over seeds (each seed's skewed split sets its own q).",
        "", markdown_table(grid, list(grid.columns)), "",
        "## Every grid point", "", table, "",
        *(["## Fed-SB against the best baseline", "",
           "Best Fed-SB rank vs the most accurate other federated method at the same setup, "
           "partition and ε (merged grids of other client counts or datasets are labelled "
           "apart); gap in accuracy points; the verdict is the paired 95 % t interval's "
           "(next section): no verdict while it contains 0; bytes_ratio = the "
           "baseline's total traffic / Fed-SB's; paired_gaps = the gap seed by seed (a seed "
           "fixes the client split), on the seeds both ran.", "",
           markdown_table(versus, versus_columns), ""] if not versus.empty else []),
        *(["## Paired differences (Fed-SB − rival, accuracy points)", "",
           PAIRED_NOTE, "", markdown_table(paired, list(paired.columns)), ""]
          if not paired.empty else []),
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots], "",
    ]
    md_path = os.path.join(path, "report.md")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    images = []
    for p in plots:
        with open(p, "rb") as fh:
            encoded = base64.b64encode(fh.read()).decode()
        images.append(f'<img alt="{html.escape(os.path.basename(p))}" '
                      f'src="data:image/png;base64,{encoded}" style="max-width:100%">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>fedsb-dp report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head><body>"
            "<h1>Privacy-utility report</h1>"
            f"<p>{len(frame)} runs; ε recomputed from every run's ledger; runs above their "
            f"target: {len(over)}.</p><p>Sources: {html.escape(provenance)}.</p>"
            + "".join(f"<p><b>Warning:</b> {html.escape(m)}</p>" for m in mixed)
            + (f"<p><b>Cells that did not run ({len(missing)})</b>: their seeds are missing "
               "from the means and from every paired comparison.</p><ul>"
               + "".join(f"<li><code>{html.escape(run)}</code>: {html.escape(reason)}</li>"
                         for run, reason in reasons)
               + "</ul>" if missing else "")
            + "<h2>Test accuracy</h2>" + _html_table(grid, list(grid.columns))
            + "<h2>Every grid point</h2>" + _html_table(summary, COLUMNS)
            + ("<h2>Fed-SB against the best baseline</h2>"
               + _html_table(versus, versus_columns) if not versus.empty else "")
            + ("<h2>Paired differences (Fed-SB − rival, accuracy points)</h2><p>"
               + html.escape(PAIRED_NOTE) + "</p>" + _html_table(paired, list(paired.columns))
               if not paired.empty else "")
            + "".join(images) + "</body></html>")
    html_path = os.path.join(path, "report.html")
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return {"results": os.path.join(path, "results.csv"), "markdown": md_path,
            "html": html_path, **{os.path.basename(p): p for p in plots}}
