"""Gaussian masks from a 32-byte seed (``veilnet-mask/1``), for masked offload (``masked/1``).

In masked mode a node computes a linear layer on ``x + r`` and a second node computes the same
layer on ``r`` alone, which it rebuilds from a seed the client sends it; the client subtracts.
Both sides must draw exactly the same ``r`` from the seed, so the expansion is specified here
(docs/protocol.md, "veilnet-mask/1") rather than left to numpy, whose distribution methods may
change between releases:

1. the keystream of ``crypto.csprng.SecureRandom(seed)`` (ChaCha20 keyed with
   SHA-256("veilnet-csprng/1" || 0x00 || seed), zero nonce), read as little-endian uint64;
2. each word to a float in [0, 1) with its top 53 bits: ``u = (w >> 11) * 2**-53``;
3. Box-Muller on consecutive pairs (u1, u2): ``rho = sqrt(-2 ln(1 - u1))``,
   ``z0 = rho cos(2 pi u2)``, ``z1 = rho sin(2 pi u2)``, in that order;
4. the first ``prod(shape)`` values, times ``sigma``, in row-major order, as float64.

Written by hand because no maintained library offers a specified, cross-version Gaussian stream
from a key. Two machines may differ in the last bit of ``log``/``cos``/``sin``; at the mask
scales used (sigma up to about 1e6) that is an error near 1e-10 in a product, far below the
1e-6 the scheme promises.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from crypto.csprng import SecureRandom
from errors import InputError

MASK_FORMAT = "veilnet-mask/1"
SEED_BYTES = 32


def new_seed() -> bytes:
    """A fresh seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def expand_mask(seed: bytes, shape: Sequence[int], sigma: float) -> np.ndarray:
    """The ``veilnet-mask/1`` Gaussian tensor N(0, sigma^2) of ``shape`` drawn from ``seed``."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise InputError(f"a mask seed must be {SEED_BYTES} bytes")
    if not (isinstance(sigma, float | int) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"mask sigma must be a positive finite number, not {sigma!r}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InputError(f"mask shape {list(shape)} has a negative dimension")
    size = math.prod(dims)
    pairs = (size + 1) // 2
    uniform = SecureRandom(seed).uniform(2 * pairs).reshape(pairs, 2)
    rho = np.sqrt(-2.0 * np.log(1.0 - uniform[:, 0]))  # 1 - u is exact: (0, 1]
    angle = (2.0 * math.pi) * uniform[:, 1]
    z = np.empty((pairs, 2), dtype=np.float64)
    np.multiply(rho, np.cos(angle), out=z[:, 0])
    np.multiply(rho, np.sin(angle), out=z[:, 1])
    out = z.reshape(-1)[:size].reshape(dims)
    out *= float(sigma)
    return out


__all__ = ["MASK_FORMAT", "SEED_BYTES", "expand_mask", "new_seed"]
