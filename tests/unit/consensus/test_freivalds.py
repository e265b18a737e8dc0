"""Freivalds' check of masked products (consensus/freivalds.py)."""

from __future__ import annotations

import numpy as np
import pytest

from consensus.freivalds import FreivaldsCheck
from crypto.masks import expand_mask, new_seed
from errors import InputError

SHAPES = [(384, 1152, 8e3), (384, 384, 5e4), (384, 1536, 8e3), (1536, 384, 2.5e5)]


@pytest.mark.parametrize(("d_in", "d_out", "sigma"), SHAPES)
def test_honest_masked_products_pass_with_headroom(d_in: int, d_out: int,
                                                   sigma: float) -> None:
    rng = np.random.default_rng(d_in + d_out)
    weight = rng.normal(0, 0.05, (d_in, d_out))
    check = FreivaldsCheck(weight)
    x = rng.normal(0, 1, (512, d_in)) + expand_mask(new_seed(), (512, d_in), sigma)
    result = check.check(x, x @ weight)
    print(f"{d_in}x{d_out} sigma {sigma:g}: worst honest row at {result.worst_ratio:.3g} of "
          "the tolerance")
    assert result.ok and result.worst_ratio < 0.25


def test_a_small_lie_in_one_entry_is_caught() -> None:
    """At the largest mask scale a change of 1e-5 in one entry (products of size ~5e5: 2e-11
    relative) is caught by fresh checks (measured 300 of 300; 4e-6: 83%), 1e-6 is within the
    rounding tolerance; lies of the kind a byzantine node tells are always caught."""
    rng = np.random.default_rng(7)
    weight = rng.normal(0, 0.05, (1536, 384))
    x = rng.normal(0, 1, (256, 1536)) + expand_mask(new_seed(), (256, 1536), 2.5e5)
    y = x @ weight
    lie, tiny = y.copy(), y.copy()
    lie[5, 7] += 1e-5
    tiny[5, 7] += 1e-6
    caught = 0
    for _ in range(40):
        check = FreivaldsCheck(weight)
        result = check.check(x, lie)
        caught += not result.ok
        if not result.ok:
            assert result.rows_failed == 1 and "wrong in 1 row" in result.describe()
        assert check.check(x, tiny).ok  # within rounding: indistinguishable from honest
        assert not check.check(x, y + rng.normal(0, 1e-3, y.shape)).ok
        assert not check.check(x, y * (1 + 1e-9)).ok
    assert caught >= 38


def test_the_unmasked_difference_is_exact_to_float64_rounding() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.05, (384, 1536))
    x = rng.normal(0, 1, (256, 384))
    r = expand_mask(new_seed(), x.shape, 8e3)
    assert np.abs(((x + r) @ weight - r @ weight) - x @ weight).max() < 1e-9


def test_wrong_shapes_and_non_finite_values_fail() -> None:
    check = FreivaldsCheck(np.ones((4, 3)))
    x = np.ones((2, 4))
    assert not check.check(x, np.ones((2, 2))).ok
    assert not check.check(x, np.full((2, 3), np.nan)).ok
    assert check.check(x, x @ np.ones((4, 3))).ok
    with pytest.raises(InputError, match="matrix"):
        FreivaldsCheck(np.ones(3))
