"""veilnet-mask/1: the Gaussian masks both the client and the mask node draw from a seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from crypto.csprng import SecureRandom
from crypto.masks import SEED_BYTES, expand_mask, new_seed
from errors import InputError


def _reference(seed: bytes, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """The spec of crypto/masks.py written out with Python's math module, value by value."""
    size = math.prod(shape)
    words = np.frombuffer(SecureRandom(seed).bytes(8 * 2 * ((size + 1) // 2)), dtype="<u8")
    out = []
    for i in range(0, len(words), 2):
        u1 = int(words[i]) >> 11
        u2 = int(words[i + 1]) >> 11
        rho = math.sqrt(-2.0 * math.log(1.0 - u1 * 2.0 ** -53))
        angle = 2.0 * math.pi * (u2 * 2.0 ** -53)
        out += [rho * math.cos(angle), rho * math.sin(angle)]
    return np.array(out[:size]).reshape(shape) * sigma


def test_expansion_follows_the_spec_value_by_value() -> None:
    seed = bytes(range(32))
    got = expand_mask(seed, (3, 7), 1234.5)
    want = _reference(seed, (3, 7), 1234.5)
    assert got.dtype == np.float64 and got.shape == (3, 7)
    # numpy's vectorized log/cos may differ from libm in the last bit
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-9)


def test_same_seed_same_mask_and_fresh_seeds_differ() -> None:
    seed = new_seed()
    assert len(seed) == SEED_BYTES
    a = expand_mask(seed, (64, 10), 5.0)
    assert np.array_equal(a, expand_mask(seed, (64, 10), 5.0))
    assert not np.array_equal(a, expand_mask(new_seed(), (64, 10), 5.0))
    assert new_seed() != new_seed()


def test_the_masks_are_gaussian_with_the_asked_scale() -> None:
    sigma = 8000.0
    values = expand_mask(new_seed(), (200_000,), sigma)
    assert abs(values.std() / sigma - 1) < 0.01
    assert abs(values.mean()) < 4 * sigma / math.sqrt(values.size)
    # Kolmogorov-Smirnov against N(0, sigma^2): a broken transform fails this by far
    assert stats.kstest(values / sigma, "norm").pvalue > 1e-4


@pytest.mark.parametrize(("seed", "shape", "sigma", "message"), [
    (b"short", (2,), 1.0, "32 bytes"),
    (bytes(32), (2,), 0.0, "positive"),
    (bytes(32), (2,), float("nan"), "positive"),
    (bytes(32), (-1, 2), 1.0, "negative"),
])
def test_bad_arguments_are_named(seed: bytes, shape: tuple[int, ...], sigma: float,
                                 message: str) -> None:
    with pytest.raises(InputError, match=message):
        expand_mask(seed, shape, sigma)


def test_odd_sizes_and_empty_shapes() -> None:
    seed = new_seed()
    odd = expand_mask(seed, (5,), 1.0)
    even = expand_mask(seed, (6,), 1.0)
    assert np.array_equal(odd, even[:5])  # one stream, cut to size
    assert expand_mask(seed, (0, 384), 1.0).shape == (0, 384)
