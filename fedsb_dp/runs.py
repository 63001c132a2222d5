"""Runs from Python: start one, resume one, open a finished one.

The notebook face of the toolkit, in the spirit of PEFT's ``get_peft_model`` and Opacus'
``make_private_with_epsilon``: bring your own objects, get the private run.

>>> import fedsb_dp                                                  # doctest: +SKIP
>>> result = fedsb_dp.run(epsilon=3, data=frame, out="runs/notebook")  # doctest: +SKIP
>>> result.epsilon(), result.audit().passed                          # doctest: +SKIP

:func:`run` and :func:`resume` drive the same code as ``fedsb-dp run`` and return a
:class:`Run`, which is also what :func:`load_run` gives for any run directory. A :class:`Run`
never trusts a number it did not recompute: :meth:`Run.epsilon` accounts the saved ledger,
:meth:`Run.audit` is the independent audit of ``fedsb-dp audit``.

In-memory data (``data=``: a pandas DataFrame, a ``datasets.Dataset`` or ``DatasetDict``)
run in-process only, because a Flower node reads its own data; the run records
``dataset="<in-memory>"`` and an operator-only digest of the rows, and :func:`resume` needs
the same rows again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsb_dp.data import DEFAULT_DATASET, IN_MEMORY_DATASET
from fedsb_dp.errors import ConfigError, FedSBError
from fedsb_dp.federated import run_dir as rd
from fedsb_dp.federated.run_config import RunConfig

if TYPE_CHECKING:
    import pandas as pd

    from accounting import FederationResult, PrivacyLedger
    from accounting.audit import AuditReport
    from fedsb_dp.models import LoadedModel

ENGINES = ("inprocess", "flower-sim")


@dataclass(frozen=True)
class Run:
    """A run directory, read: settings, ledger, metrics, summary (if it finished).

    Attributes:
        path: The run directory.
        config: Its settings (``config.json``).
        ledger: Its privacy ledger (``ledger.json``), validated on load.
        metrics: One row per completed round (``metrics.jsonl``).
        summary: ``summary.json``, or ``None`` while the run is unfinished.
        engine: ``"inprocess"`` or ``"flower"``, as recorded.
    """

    path: str
    config: RunConfig
    ledger: PrivacyLedger
    metrics: pd.DataFrame
    summary: dict[str, Any] | None
    engine: str

    @property
    def status(self) -> str:
        """``"completed"``, ``"stopped-budget"``, ``"stopped-nonfinite"`` or ``"unfinished"``."""
        return self.summary["status"] if self.summary else "unfinished"

    def privacy(self, accountant: str | None = None, *,
                delta: float | None = None) -> FederationResult:
        """Every client's ε, recomputed from the ledger (the federation's ε is the max).

        Args:
            accountant: ``"prv"``, ``"pld"`` or ``"rdp"``; default: the run's own.
            delta: δ to account at; default: the run's target δ.

        Returns:
            The per-client results and their maximum.
        """
        from accounting import federation_epsilon

        return federation_epsilon(self.ledger, delta=delta,
                                  accountant=accountant or self.config.accountant)

    def epsilon(self, accountant: str | None = None, *, delta: float | None = None) -> float:
        """The run's ε (max over clients, an upper bound), recomputed from the ledger.

        Args:
            accountant: ``"prv"``, ``"pld"`` or ``"rdp"``; default: the run's own.
            delta: δ to account at; default: the run's target δ.

        Returns:
            ε, or ``inf`` for a non-private run.
        """
        if not self.config.private:
            return math.inf
        return self.privacy(accountant, delta=delta).epsilon

    def audit(self, *, eps_error: float = 0.01) -> AuditReport:
        """The independent audit of ``fedsb-dp audit`` (torch-free, from the files alone)."""
        from accounting.audit import audit_run

        return audit_run(self.path, eps_error=eps_error)

    @property
    def label_names(self) -> list[str]:
        """The class names (a classifier or a causal-LM label task), else empty."""
        if self.config.task == "causal-lm" and self.config.lm_format != "label":
            return []  # free-form responses; data.json may still list a label column's values
        names = (self.summary or {}).get("label_names")
        if names is None:
            names = self._read(rd.DATA, {}).get("label_names")
        return list(names or [])

    def load_model(self, device: str | None = None) -> LoadedModel:
        """The base model with this run's trained adapters and head, in eval mode.

        A finished run gives its final adapter; an unfinished one its last completed round.

        Args:
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``; default: the run's.

        Raises:
            ConfigError: If a classification run has not saved its label names (nothing to
                size the head), or the device is not on this machine.
        """
        from fedsb_dp.use.loading import adapter_paths, assemble, check_label_names

        check_label_names(self.config, self.label_names, self.path)
        adapter, checkpoint = adapter_paths(
            self.path, finished=self.summary is not None,
            rounds_done=self._read(rd.PROGRESS, {}).get("aggregated_rounds", 0))
        return assemble(self.config, self.label_names, adapter, checkpoint=checkpoint,
                        device=device)

    def export(self, out: str, format: str = "peft", *,  # noqa: A002
               force: bool = False) -> str:
        """Save the trained model for use outside fedsb-dp (see :mod:`fedsb_dp.use.export`).

        Args:
            out: The output directory (refused if it exists and is not empty, unless
                ``force``).
            format: ``"peft"``, ``"merged"`` or ``"sb"``.
            force: Replace a non-empty ``out``.

        Returns:
            ``out``.
        """
        from fedsb_dp.use.export import export_run

        return export_run(self, out, format, force=force)

    def predict(self, texts: list[str], *, pairs: list[str] | None = None,
                batch_size: int = 32, device: str | None = None) -> pd.DataFrame:
        """Classify texts with the trained model: label by name and every class probability.

        A run trained on text pairs needs ``pairs``, the second text of each example.
        See :func:`fedsb_dp.use.predict.predict_texts`.
        """
        from fedsb_dp.use.predict import check_predictable, predict_texts

        check_predictable(self, texts, batch_size=batch_size, pairs=pairs)
        return predict_texts(self.load_model(device=device), texts, batch_size=batch_size,
                             max_length=self.config.max_length, pairs=pairs)

    def generate(self, prompts: str | list[str], *, max_new_tokens: int = 32,
                 template: bool = False, temperature: float = 0.0, seed: int | None = None,
                 device: str | None = None) -> list[str]:
        """Continue prompts with a trained causal LM (greedy unless ``temperature > 0``).

        See :func:`fedsb_dp.use.generate.generate_texts`.
        """
        from fedsb_dp.use.generate import check_generation, generate_texts, prompt_texts

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_generation(self, prompts, max_new_tokens=max_new_tokens, template=template,
                         temperature=temperature)
        return generate_texts(self.load_model(device=device), prompt_texts(self, prompts,
                                                                           template),
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed)

    def _read(self, name: str, default: Any) -> Any:
        path = os.path.join(self.path, name)
        return rd.read_json(path) if os.path.exists(path) else default


def load_run(run_dir: str) -> Run:
    """Open a run directory (finished or not).

    Args:
        run_dir: A directory written by :func:`run`, ``fedsb-dp run`` or the Flower app.

    Returns:
        The run; ε and the audit are recomputed on request, never read from the summary.

    Raises:
        ConfigError: If ``run_dir`` is not a run directory.
        accounting.LedgerIntegrityError: If the ledger fails its integrity checks.
    """
    import pandas as pd

    from accounting import PrivacyLedger

    missing = [name for name in (rd.CONFIG, rd.LEDGER)
               if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise ConfigError(f"{run_dir!r} is not a run directory (no {', '.join(missing)})")
    saved = rd.read_json(os.path.join(run_dir, rd.CONFIG))
    config = RunConfig.from_dict({**rd.saved_settings(saved["config"]), "out": run_dir})
    metrics_path = os.path.join(run_dir, rd.METRICS)
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    summary_path = os.path.join(run_dir, rd.SUMMARY)
    return Run(path=run_dir, config=config,
               ledger=PrivacyLedger.load(os.path.join(run_dir, rd.LEDGER)),
               metrics=pd.DataFrame(rows),
               summary=rd.read_json(summary_path) if os.path.exists(summary_path) else None,
               engine=saved.get("engine", "inprocess"))


def _settings(config: RunConfig | Mapping[str, Any] | None, settings: Mapping[str, Any],
              data: Any) -> RunConfig:
    values = dict(config.to_dict() if isinstance(config, RunConfig) else config or {})
    values.update(settings)
    if data is not None:
        dataset = values.get("dataset", DEFAULT_DATASET)
        if dataset not in (DEFAULT_DATASET, IN_MEMORY_DATASET):
            raise ConfigError(f"dataset={dataset!r} and data= were both given; give one")
        values["dataset"] = IN_MEMORY_DATASET
    return RunConfig.from_dict(values)


def _flower_simulation():
    try:
        from fedsb_dp.flower.simulation import run_flower_simulation
    except ImportError as exc:
        raise FedSBError(f"engine='flower-sim' needs the 'flower' extra ({exc}); install it "
                         "with: pip install -e '.[flower]'") from exc
    return run_flower_simulation


def _refuse_flower_data(data: Any) -> None:
    if data is not None:
        raise ConfigError(
            "engine='flower-sim' cannot take data=: every Flower node reads its own records "
            "(in a deployment they never leave its machine). Use engine='inprocess', or save "
            "the table to a CSV/Parquet file and pass dataset=PATH")


def run(config: RunConfig | Mapping[str, Any] | None = None, /, *, data: Any = None,
        engine: str = "inprocess", progress: bool = False, export_merged: bool = False,
        export_peft: bool = False, **settings: Any) -> Run:
    """Run a private federated fine-tuning and return it, read back from its directory.

    Args:
        config: The settings (a :class:`RunConfig` or a dict of its fields); keyword
            ``settings`` override them, so ``run(epsilon=3, rounds=5)`` needs no config.
        data: In-memory data instead of ``dataset``: a pandas DataFrame or
            ``datasets.Dataset`` (split into train/validation/test by the same keyed hash as
            a file with those rows), or a ``DatasetDict`` / dict of split → table (its
            ``validation`` and ``test`` splits are kept, or the ones ``train_split``,
            ``validation_split`` and ``test_split`` name). Columns are ``text_column``,
            ``label_column`` (and ``text_pair_column``); ``partition="column:NAME"`` makes
            one client per value of column NAME. In-process only.
        engine: ``"inprocess"`` or ``"flower-sim"`` (the Flower app on Flower's simulation
            engine; needs the ``flower`` extra).
        progress: Show progress bars.
        export_merged: Also save a merged ``transformers`` model in ``merged/`` (as
            :meth:`Run.export` with ``format="merged"``).
        export_peft: Also save a PEFT LoRA adapter in ``peft_adapter/`` (refused for
            FedEx-LoRA and FLoRA, whose updates live in the base weights).
        **settings: :class:`RunConfig` fields.

    Returns:
        The run (also on disk in ``config.out``, default ``runs/run-<timestamp>``).

    Raises:
        ConfigError: For bad settings or data, raised before anything is written or spent.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not one of {ENGINES}")
    config = _settings(config, settings, data)
    if engine == "flower-sim":
        _refuse_flower_data(data)
        result = _flower_simulation()(config)
        from fedsb_dp.use.export import export_into_run_dir

        export_into_run_dir(result.run_dir, merged=export_merged, peft=export_peft)
    else:
        from fedsb_dp.federated.inprocess import run_federation

        result = run_federation(config, data=data, progress=progress,
                                export_merged=export_merged, export_peft=export_peft)
    return load_run(result.run_dir)


def resume(run_dir: str, *, data: Any = None, progress: bool = False) -> Run:
    """Continue an unfinished run from its last completed round, on the engine it ran on.

    Args:
        run_dir: The run directory.
        data: For a run on in-memory data, the same data again (same rows, same order);
            refused when its digest differs from the one the run recorded.
        progress: Show progress bars.

    Returns:
        The run, read back from its directory.

    Raises:
        ConfigError: If the run has finished, needs its in-memory data, or the data differ.
    """
    if os.path.exists(os.path.join(run_dir, rd.SUMMARY)):
        raise ConfigError(f"{run_dir!r} has finished ({rd.SUMMARY} exists); nothing to "
                          "resume: open it with load_run")
    if not os.path.isfile(os.path.join(run_dir, rd.CONFIG)):
        raise ConfigError(f"{run_dir!r} is not a run directory (no {rd.CONFIG})")
    if rd.read_json(os.path.join(run_dir, rd.CONFIG)).get("engine") == "flower":
        _refuse_flower_data(data)
        _flower_simulation()(resume=run_dir)
    else:
        from fedsb_dp.federated.inprocess import run_federation

        config = RunConfig.from_dict({"no_dp": True, "out": run_dir})  # replaced on load
        run_federation(config, resume=True, data=data, progress=progress)
    return load_run(run_dir)
