"""A cryptographically secure random source that yields numpy arrays.

numpy's generators (PCG64, Philox, ...) are statistical generators, not CSPRNGs, and numpy has no
bit generator backed by the OS entropy pool. EE key material must be unpredictable, so this module
draws its bytes from ChaCha20 (pyca/cryptography) keyed with 32 bytes from ``os.urandom``. Passing
an explicit seed makes the stream reproducible; that is for tests only.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # fixed: every key is used for exactly one stream


class SecureRandom:
    """A ChaCha20 keystream turned into uniform integers, floats and permutations."""

    def __init__(self, seed: bytes | int | None = None) -> None:
        if seed is None:
            key = os.urandom(32)
        else:
            material = seed.to_bytes(32, "big", signed=False) if isinstance(seed, int) else seed
            key = hashlib.sha256(b"veilnet-csprng/1\x00" + material).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self.bytes(8 * n), dtype="<u8").copy()

    def uniform(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Floats in [0, 1) with 53 random bits each."""
        size = int(np.prod(shape))
        # the top 53 bits fit an int64, whose conversion to float64 numpy vectorizes (uint64's
        # is several times slower); the values are the same
        top = (self.uint64(size) >> np.uint64(11)).view(np.int64)
        return (top * (1.0 / (1 << 53))).reshape(shape)

    def normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """Standard normal floats (Box-Muller)."""
        size = int(np.prod(shape))
        half = (size + 1) // 2
        u1 = 1.0 - self.uniform(half)  # (0, 1]: log is finite
        u2 = self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
        return z[:size].reshape(shape)

    def permutation(self, n: int) -> np.ndarray:
        """A uniformly random permutation of range(n) (Fisher-Yates, unbiased by rejection)."""
        perm = np.arange(n, dtype=np.int64)
        for i in range(n - 1, 0, -1):
            j = self._below(i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        return perm

    def _below(self, bound: int) -> int:
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            value = int(self.uint64(1)[0])
            if value < limit:
                return value % bound
