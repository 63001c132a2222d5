"""Named random streams derived from one root seed; library code never touches global RNGs.

With a root seed every stream (partitioning, client sampling, Poisson batches, noise) is a
deterministic function of (seed, stream name, indices), so a resumed run draws what the
uninterrupted run would have drawn. Without one, each stream is seeded from OS entropy — the
mode for real releases.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch


class RandomStreams:
    """Factory of independent generators, one per (name, indices).

    Args:
        seed: Root seed; ``None`` draws every stream from OS entropy.

    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    @property
    def seeded(self) -> bool:
        """Whether draws are reproducible (then DP noise is not a private release)."""
        return self.seed is not None

    def _state(self, name: str, indices: tuple[int, ...]) -> int:
        if self.seed is None:
            return int.from_bytes(os.urandom(8), "little")
        words = [self.seed, zlib.crc32(name.encode()), *indices]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])

    def torch(self, name: str, *indices: int,
              device: torch.device | str = "cpu") -> torch.Generator:
        """A ``torch.Generator`` for stream ``name`` at ``indices``, drawing on ``device``.

        The same stream state seeds a generator on any device, but a CUDA generator
        (Philox) draws other numbers than the CPU's (Mersenne Twister) from it: a seeded
        run repeats itself on the same kind of device only.
        """
        return torch.Generator(device=device).manual_seed(self._state(name, indices))

    def numpy(self, name: str, *indices: int) -> np.random.Generator:
        """A NumPy generator for stream ``name`` at ``indices``."""
        return np.random.default_rng(self._state(name, indices))

    def integer(self, name: str, *indices: int) -> int:
        """A 63-bit integer seed for stream ``name`` (e.g. to record a partition seed)."""
        return self._state(name, indices) & ((1 << 63) - 1)
