"""Splitting the training records among clients: IID, Dirichlet label skew, quantity skew.

Every partition is deterministic given its seed, disjoint and complete (each record lands in
exactly one client). The non-IID splits use the partitioners of ``flwr-datasets``
(``DirichletPartitioner``, ``InnerDirichletPartitioner``; ``SizePartitioner`` over a seeded
shuffle for quantity skew), run
offline on an in-memory ``datasets.Dataset``; only the partitioning is theirs, the record
bookkeeping (a row-index column) and the checks are ours.

Spec strings (``--partition``): ``iid``, ``dirichlet:<alpha>`` (label proportions per client
~ Dirichlet(α); small α = strong skew), ``labelmix:<alpha>`` (equal client sizes, each
client's label mix ~ Dirichlet(α)), ``quantity:<beta>`` (client sizes ~ Dirichlet(β),
labels IID), ``column:<NAME>`` (a natural partition: one client per distinct value of column
NAME, as real federated data arrive — one user, one hospital).

A natural partition's clients are named by index (``client-0``…, in the sorted order of the
values), never by value: client ids appear in the released ledger, and a value (a user id, a
hospital) may itself be sensitive. The value → client mapping stays with the operator
(``partition.json``).

Degenerate splits. At small α a draw can leave a client with one label (every method then
ends near the minority rate, and the comparison measures the split, not the method).
``dirichlet:<alpha>:<m>`` keeps a floor: the draw is repeated until every client holds at least
``m`` labels with at least :data:`MIN_LABEL_RECORDS` records each. Draw 0 uses the run's
partition seed (so it equals the plain ``dirichlet:<alpha>`` split whenever that one already
meets the floor); redraw ``k`` uses a seed derived from (partition seed, k). The number of
redraws is recorded in ``partition.json``. The redraw reads the labels, like the size floor
flwr-datasets already applies: both are part of setting up the simulated federation, before
anything is trained or released, and the rule itself is public (it is in the run's config).

Two Dirichlet label skews. ``dirichlet:<alpha>`` splits *each class* among the clients in
Dirichlet(α) proportions, so client sizes vary too; with few labels and many clients some
clients end up with almost nothing (Rotten Tomatoes' 2 labels over 30 clients at α = 0.3 leave
a client under 32 records in every draw). ``labelmix:<alpha>`` gives every client the same
number of records (±1) and draws *each client's label mix* from Dirichlet(α) — the convention
of Hsu et al. (2019) and Acar et al. (2021) — so the skew is in labels only and many clients
stay trainable. It takes the same ``:<m>`` label floor.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedsb_dp.errors import ConfigError

PARTITION_KINDS = ("iid", "dirichlet", "labelmix", "quantity", "column")
#: Kinds that skew labels (they need a labelled task).
LABEL_SKEWS = ("dirichlet", "labelmix")
#: Most clients a natural partition may create (the in-process driver holds them all).
MAX_NATURAL_CLIENTS = 1000
_ROW = "__fedsb_row__"
#: Records a label needs on a client to count towards the ``dirichlet:<alpha>:<m>`` floor.
MIN_LABEL_RECORDS = 10
#: Draws tried before a label floor is declared unreachable.
MAX_DRAWS = 100


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition`` value.

    Attributes:
        kind: ``"iid"``, ``"dirichlet"``, ``"labelmix"``, ``"quantity"`` or ``"column"``.
        concentration: α (the label skews) or β (quantity); ``None`` for IID and column.
        column: The column whose values are the clients (``column`` only).
        min_labels: Label skews only: labels (each with ≥ :data:`MIN_LABEL_RECORDS` records)
            every client must hold; ``None`` = no floor.
    """

    kind: str
    concentration: float | None = None
    column: str | None = None
    min_labels: int | None = None

    @classmethod
    def parse(cls, spec: str) -> PartitionSpec:
        """Parse ``iid`` / ``dirichlet:0.3`` / ``quantity:0.5``.

        Raises:
            ConfigError: Unknown kind, missing or non-positive concentration.
        """
        if not isinstance(spec, str):
            raise ConfigError(f"partition={spec!r} must be a string such as 'dirichlet:0.3'")
        kind, _, value = spec.strip().partition(":")
        column_name = value  # a column name may itself hold ':'
        value, _, floor = value.partition(":")
        if kind not in PARTITION_KINDS:
            raise ConfigError(f"partition={spec!r}: kind {kind!r} is not one of "
                              f"{PARTITION_KINDS} (e.g. 'iid', 'dirichlet:0.3', 'quantity:0.5', "
                              "'column:site')")
        if kind == "column":
            if not column_name.strip():
                raise ConfigError(f"partition={spec!r}: column needs a column name, e.g. "
                                  "'column:site'")
            return cls("column", column=column_name.strip())
        if kind == "iid":
            if value or floor:
                raise ConfigError(f"partition={spec!r}: 'iid' takes no parameter")
            return cls("iid")
        try:
            concentration = float(value)
        except ValueError:
            raise ConfigError(f"partition={spec!r}: {kind} needs a number, e.g. "
                              f"'{kind}:0.3'") from None
        if not (concentration > 0 and math.isfinite(concentration)):
            name = "alpha" if kind in LABEL_SKEWS else "beta"
            raise ConfigError(f"partition={spec!r}: {name}={concentration} must be > 0 and "
                              "finite")
        if not floor:
            return cls(kind, concentration)
        if kind not in LABEL_SKEWS or not floor.isdigit() or int(floor) < 1:
            raise ConfigError(f"partition={spec!r}: a label floor is '{kind}:<alpha>:<m>' "
                              "with m an integer ≥ 1 (labels each client keeps), and only "
                              f"the label skews {LABEL_SKEWS} take one")
        return cls(kind, concentration, min_labels=int(floor))

    def __str__(self) -> str:
        if self.kind == "column":
            return f"column:{self.column}"
        if self.concentration is None:
            return self.kind
        floor = "" if self.min_labels is None else f":{self.min_labels}"
        return f"{self.kind}:{self.concentration:g}{floor}"


def natural_partition(groups: pd.Series, *, min_records: int,
                      ) -> tuple[list[np.ndarray], list[Any]]:
    """One client per distinct value of ``groups``, in the sorted order of the values.

    Args:
        groups: Each training record's value of the partition column.
        min_records: Fewest records a client may hold (its expected batch, or what its
            initialisation samples).

    Returns:
        One sorted index array per client and the value each client holds.

    Raises:
        ConfigError: Too many distinct values, or a value with fewer than ``min_records``
            records (named with its count).
    """
    counts = groups.value_counts(sort=False)
    values = sorted(counts.index.tolist(), key=lambda v: (str(type(v)), v))
    if len(values) > MAX_NATURAL_CLIENTS:
        raise ConfigError(f"the partition column has {len(values)} distinct values, more than "
                          f"{MAX_NATURAL_CLIENTS} clients; is it a record id rather than a "
                          "user or site column?")
    small = [(v, int(counts[v])) for v in values if counts[v] < min_records]
    if small:
        shown = ", ".join(f"{v!r} ({n})" for v, n in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        raise ConfigError(f"value(s) {shown}{more} of the partition column hold fewer than "
                          f"{min_records} training records, the least one client needs (its "
                          "expected batch --batch-size, or --init-examples); merge or drop "
                          "them, or lower --batch-size")
    positions = {v: i for i, v in enumerate(values)}
    index = groups.map(positions).to_numpy()
    return [np.flatnonzero(index == i) for i in range(len(values))], values


def iid_partition(num_records: int, *, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle record indices with a seeded generator and cut them into near-equal parts.

    Args:
        num_records: Records to distribute.
        num_clients: Number of clients (≥ 1, ≤ num_records).
        seed: Seed of the partitioning stream.

    Returns:
        One sorted index array per client; together they hold every index exactly once.

    Raises:
        ConfigError: If there are no clients or fewer records than clients.
    """
    _check_counts(num_records, num_clients, 1)
    order = np.random.default_rng(seed).permutation(num_records)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def _check_counts(num_records: int, num_clients: int, min_records: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be ≥ 1")
    if num_records < num_clients * min_records:
        raise ConfigError(
            f"num_clients={num_clients} × min_records={min_records} exceeds the {num_records} "
            "training records: every client needs at least min_records records")


def _as_dataset(labels: np.ndarray):
    try:
        from datasets import Dataset
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise ConfigError("non-IID partitions need the 'datasets' package") from exc
    return Dataset.from_pandas(pd.DataFrame({_ROW: np.arange(len(labels)), "label": labels}),
                               preserve_index=False)


def _flwr_partitioners():
    try:
        from flwr_datasets import partitioner
    except ImportError as exc:
        raise ConfigError("non-IID partitions use flwr-datasets' partitioners: install the "
                          "'flower' extra (pip install 'fedsb-dp[flower]')") from exc
    return partitioner


def dirichlet_partition(labels: np.ndarray, *, num_clients: int, alpha: float, seed: int,
                        min_records: int) -> list[np.ndarray]:
    """Label skew: each class is split among clients in Dirichlet(α) proportions.

    Sampling is repeated (by flwr-datasets) until every client holds ≥ ``min_records``.

    Raises:
        ConfigError: If no draw gives every client ``min_records`` records.
    """
    _check_counts(len(labels), num_clients, min_records)
    partitioner = _flwr_partitioners().DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha,
        min_partition_size=min_records, self_balancing=False, shuffle=True,
        seed=seed % (2**32))
    partitioner.dataset = _as_dataset(labels)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns on every redraw; a final failure is reported below.
            warnings.simplefilter("ignore", UserWarning)
            return [np.sort(np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64))
                    for i in range(num_clients)]
    except ValueError as exc:
        raise ConfigError(
            f"dirichlet:{alpha:g} over {num_clients} clients left a client with fewer than "
            f"{min_records} records in every draw ({exc}); raise alpha, use fewer clients, or "
            "lower --batch-size") from None


def label_mix_partition(labels: np.ndarray, *, num_clients: int, alpha: float, seed: int,
                        ) -> list[np.ndarray]:
    """Equal client sizes (±1), each client's label mix drawn from Dirichlet(α).

    flwr-datasets' ``InnerDirichletPartitioner`` assigns records one at a time to a client
    that still has room, with a label drawn from that client's mix; when a label runs out its
    probability is set to zero and the mixes are renormalised, so the split is complete.

    Raises:
        ConfigError: If a client's whole mix lies on labels that ran out (possible only when
            α is so small that a draw underflows to a point mass).
    """
    _check_counts(len(labels), num_clients, 1)
    # the partitioner indexes classes 0..K-1 by position: map labels onto that range
    _, dense = np.unique(np.asarray(labels), return_inverse=True)
    base, extra = divmod(len(labels), num_clients)
    sizes = [base + (i < extra) for i in range(num_clients)]
    partitioner = _flwr_partitioners().InnerDirichletPartitioner(
        partition_sizes=sizes, partition_by="label", alpha=float(alpha), shuffle=True,
        seed=seed % (2**32))
    partitioner.dataset = _as_dataset(dense.astype(np.int64))
    with warnings.catch_warnings():
        # a renormalisation over exhausted labels divides 0 by 0; it is caught just below
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return [np.sort(np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64))
                    for i in range(num_clients)]
        except ValueError as exc:
            raise ConfigError(
                f"labelmix:{alpha:g} over {num_clients} clients drew a client whose labels all "
                f"ran out before it was full ({exc}); raise alpha") from None


def quantity_partition(num_records: int, *, num_clients: int, beta: float, seed: int,
                       min_records: int) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ Dirichlet(β) (at least ``min_records`` each), labels IID.

    Each client first gets ``min_records``; the rest is shared in Dirichlet(β) proportions
    (largest-remainder rounding so the sizes sum to N). Records are shuffled with the seed and
    cut to those sizes by flwr-datasets' ``SizePartitioner``.
    """
    _check_counts(num_records, num_clients, min_records)
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_clients, beta))
    spare = num_records - num_clients * min_records
    raw = shares * spare
    sizes = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - sizes))[: spare - int(sizes.sum())]:
        sizes[i] += 1
    sizes += min_records
    order = rng.permutation(num_records)
    partitioner = _flwr_partitioners().SizePartitioner(partition_sizes=[int(s) for s in sizes])
    partitioner.dataset = _as_dataset(np.zeros(num_records, dtype=np.int64))
    return [np.sort(order[np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64)])
            for i in range(num_clients)]


def short_clients(labels: np.ndarray, parts: list[np.ndarray], *, min_labels: int,
                  min_per_label: int = MIN_LABEL_RECORDS) -> list[str]:
    """Clients holding fewer than ``min_labels`` labels with ≥ ``min_per_label`` records."""
    labels = np.asarray(labels)
    short = []
    for i, part in enumerate(parts):
        _, counts = np.unique(labels[part], return_counts=True)
        if int(np.sum(counts >= min_per_label)) < min_labels:
            short.append(client_id(i))
    return short


def _redraw_seed(seed: int, draw: int) -> int:
    """Draw 0 is the partition seed itself; later draws get independent derived seeds."""
    if draw == 0:
        return seed
    return int(np.random.SeedSequence([seed % (2**63), draw]).generate_state(1)[0])


def partition_records(labels: np.ndarray, spec: PartitionSpec | str, *, num_clients: int,
                      seed: int, min_records: int = 1,
                      details: dict | None = None) -> list[np.ndarray]:
    """Split record indices 0..N−1 among clients according to ``spec``.

    Args:
        labels: One label per record.
        spec: The partition (see the module docstring).
        num_clients: Clients to split among.
        seed: The public partition seed.
        min_records: Records every client must hold.
        details: If given, receives ``redraws`` (Dirichlet draws rejected by the label floor)
            and the ``label_floor`` applied, for ``partition.json``.

    Returns:
        One sorted index array per client, disjoint and together complete.

    Raises:
        ConfigError: Bad spec, too few records, a client left below ``min_records``, or no
            draw in :data:`MAX_DRAWS` meeting the label floor.
    """
    spec = PartitionSpec.parse(spec) if isinstance(spec, str) else spec
    labels = np.asarray(labels)
    _check_counts(len(labels), num_clients, min_records)
    if spec.kind == "iid":
        parts = iid_partition(len(labels), num_clients=num_clients, seed=seed)
    elif spec.kind in LABEL_SKEWS:
        floor = spec.min_labels
        if floor is not None and floor > len(np.unique(labels)):
            raise ConfigError(f"partition={str(spec)!r}: a floor of {floor} labels per client "
                              f"exceeds the {len(np.unique(labels))} labels of the data")
        for draw in range(MAX_DRAWS if floor is not None else 1):
            if spec.kind == "dirichlet":
                parts = dirichlet_partition(labels, num_clients=num_clients,
                                            alpha=spec.concentration,
                                            seed=_redraw_seed(seed, draw),
                                            min_records=min_records)
            else:
                parts = label_mix_partition(labels, num_clients=num_clients,
                                            alpha=spec.concentration,
                                            seed=_redraw_seed(seed, draw))
            if floor is None or not short_clients(labels, parts, min_labels=floor):
                break
        else:
            raise ConfigError(
                f"partition={str(spec)!r}: no draw in {MAX_DRAWS} left every one of "
                f"{num_clients} clients {floor} labels with ≥ {MIN_LABEL_RECORDS} records; "
                "raise alpha, lower the floor, or use fewer clients")
        if details is not None and floor is not None:
            details.update(redraws=draw, label_floor={
                "min_labels": floor, "min_records_per_label": MIN_LABEL_RECORDS})
    else:
        parts = quantity_partition(len(labels), num_clients=num_clients,
                                   beta=spec.concentration, seed=seed, min_records=min_records)
    check_partition(parts, len(labels), min_records=min_records)
    return parts


def client_id(index: int) -> str:
    """Ledger key of the client holding partition ``index`` (``"client-0"``, …)."""
    return f"client-{index}"


def check_partition(parts: list[np.ndarray], num_records: int, *, min_records: int = 1) -> None:
    """Disjoint, complete, every client ≥ ``min_records`` (raises ConfigError otherwise)."""
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    if len(joined) != num_records or len(np.unique(joined)) != num_records \
            or (num_records and (joined.min() < 0 or joined.max() >= num_records)):
        raise ConfigError("partition is not disjoint and complete")  # a bug, not bad input
    small = {client_id(i): len(p) for i, p in enumerate(parts) if len(p) < min_records}
    if small:
        raise ConfigError(f"clients {small} hold fewer than {min_records} records")


def partition_report(labels: np.ndarray, parts: list[np.ndarray],
                     label_names: tuple[str, ...]) -> dict[str, dict]:
    """Per client: size and label histogram (written to the run directory)."""
    labels = np.asarray(labels)
    return {
        client_id(i): {
            "records": int(len(part)),
            "labels": {name: int(np.sum(labels[part] == k)) for k, name in enumerate(label_names)},
        }
        for i, part in enumerate(parts)
    }


def client_frames(frame: pd.DataFrame, parts: list[np.ndarray]) -> dict[str, pd.DataFrame]:
    """Client id (``"client-0"``, …) → that client's records."""
    out = {}
    for index, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(f"{client_id(index)} received no records")
        out[client_id(index)] = frame.iloc[part].reset_index(drop=True)
    return out
