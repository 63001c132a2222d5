"""The benchmark's answer, read from the archived grids: does Fed-SB beat the private head alone
and every adapter baseline, at ε = 1 and 3, on both tasks, with 3–30 clients, IID and non-IID?

Nothing is trained here. Every archived run of the grids below is read with its ε recomputed
from its own ledger (PRV upper bound, max over clients); a run over its target, a run counted
twice, or methods of one comparison run at different budgets stop the script with the reason.
Fed-SB's best rank is then paired by seed against the head alone and against the most
accurate adapter baseline of the same experiment (95 % Student-t interval; a verdict only
where it excludes 0). Prints the table and writes ``answer.md`` and ``answer.csv``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/answer.py --out benchmarks/results/answer

Experiments are listed in :data:`EXPERIMENTS`, by archive directory under
``benchmarks/results`` (``--results`` points elsewhere); each names the grids that share one
training budget. It accounts 382 ledgers: about 2 min on the 2-core machine beside a sweep
(68 s idle at 258).
"""

from __future__ import annotations

import argparse
import logging
import os

from fedsb_dp.federated.run_dir import write_json_atomic
from fedsb_dp.sweep.answer import (
    Experiment,
    answer_markdown,
    answer_table,
    missing_cells,
    read_experiment,
    verdict_counts,
)

#: (name, archive directories): the grids of one training budget each.
EXPERIMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Rotten Tomatoes, 3 clients", ("privacy_utility", "privacy_utility_fedsb16", "head_only",
                                     "newest_rivals")),
    ("Rotten Tomatoes, 10 clients", ("clients10", "clients10_dirichlet")),
    ("Rotten Tomatoes, 30 clients", ("clients30",)),
    ("20 Newsgroups, 3 clients", ("newsgroups_private", "newsgroups_budget")),
    ("20 Newsgroups, 10 clients", ("newsgroups_clients10",)),
    ("20 Newsgroups, 30 clients", ("newsgroups_clients30",)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results",
                        help="directory holding the archived grids")
    parser.add_argument("--out", default="benchmarks/results/answer",
                        help="where answer.md, answer.csv and answer.json go")
    args = parser.parse_args()
    # The RDP cross-check warns on every order it drops at large q; the PRV bound is reported.
    logging.getLogger().setLevel(logging.ERROR)
    experiments = [Experiment(name, tuple(os.path.join(args.results, g) for g in grids))
                   for name, grids in EXPERIMENTS]
    frames = {e.name: read_experiment(e) for e in experiments}
    table = answer_table(frames)
    missing = {e.name: missing_cells(e) for e in experiments}
    markdown = answer_markdown(table, frames, experiments, missing)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "answer.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)
    table.to_csv(os.path.join(args.out, "answer.csv"), index=False)
    write_json_atomic(os.path.join(args.out, "answer.json"),
                      {"verdict_counts": verdict_counts(table),
                       "runs": {name: len(frame) for name, frame in frames.items()},
                       "did_not_run": missing})
    print(markdown)


if __name__ == "__main__":
    main()
