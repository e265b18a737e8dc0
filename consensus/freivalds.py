"""Freivalds' check of a node's matrix product, for masked offload (``masked/1``).

A node claims ``y = x W`` for a ``W`` the client knows (public weights). Recomputing ``x W``
would cost the client what the node saved. Instead the client keeps secret random vectors
``v`` (``k`` columns, Gaussian, fresh per client) and ``W v``, computed once, and checks
``y v == x (W v)``: O(rows * (d_in + d_out) * k) per call instead of O(rows * d_in * d_out).
A wrong ``y`` passes only if its error is (nearly) orthogonal to every column of ``v``, which
the node cannot arrange without knowing ``v``; for a Gaussian ``v`` that has probability 0 for
an error above the tolerance.

Tolerance: floating-point products are not exact, so equality is checked within a bound on
rounding per row. The worst-case bound (Higham, "Accuracy and Stability of Numerical
Algorithms", 3.1: ``|fl(x W) - x W| <= gamma_n |x| |W|``) sums absolute values and is about
10^4 times the error honest float64 products show at masked scales, so a liar could hide
errors of 1e-3 under it. The check uses the statistical size of rounding instead (errors of
n terms grow like sqrt(n) u, Higham and Mary 2019), per row i and check vector k:

    |y_i v_k - x_i (W v_k)| <= TOLERANCE * u * (sqrt(d_in) |x_i| (s_k + |W v_k|)
                                                 + sqrt(d_out) |y_i| |v_k|),
    s_k = sqrt(sum_j |W[:, j]|^2 v_jk^2),  u = 2^-53 (float64), |.| the 2-norm

with TOLERANCE = 1: honest products measured at most 0.05 of it (tests/unit/consensus/
test_freivalds.py reports the figure; onnxruntime's float64 MatMul on the real shards too), and
a lie passes only when it moves the product by about the rounding a masked product carries
anyway: at sigma 2.5e5, 1e-5 on one entry of a [256, 384] product (2e-11 relative) was caught
by 300 of 300 fresh checks, 4e-6 by 83%, and 1e-6 passes. Pure
numpy, no I/O (consensus/ is pure logic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crypto.masks import expand_mask, new_seed
from errors import InputError

UNIT_ROUNDOFF = 2.0 ** -53  # float64
CHECK_VECTORS = 4
TOLERANCE = 1.0  # times the statistical rounding size (module docstring)


@dataclass(frozen=True)
class ProductCheck:
    """The outcome of one check: ``ok`` and the worst row's error over its bound."""

    ok: bool
    worst_ratio: float
    rows_failed: int

    def describe(self) -> str:
        if self.ok:
            return f"product checked (worst row at {self.worst_ratio:.2g} of the bound)"
        return (f"the product is wrong in {self.rows_failed} row(s) (worst error "
                f"{self.worst_ratio:.3g}x the rounding tolerance)")


class FreivaldsCheck:
    """Checks claimed products ``x W`` for one weight ``W`` [d_in, d_out] (float64)."""

    def __init__(self, weight: np.ndarray, seed: bytes | None = None,
                 vectors: int = CHECK_VECTORS) -> None:
        if weight.ndim != 2:
            raise InputError(f"a Freivalds check needs a matrix, not shape {weight.shape}")
        w = np.asarray(weight, dtype=np.float64)
        self.d_in, self.d_out = w.shape
        # Gaussian columns from a fresh CSPRNG seed: any error vector is caught with
        # probability 1 (``seed`` only for tests)
        self._v = expand_mask(seed or new_seed(), (self.d_out, vectors), 1.0)
        self._wv = w @ self._v
        self._wv_norm = np.linalg.norm(self._wv, axis=0)
        self._spread = np.sqrt((np.linalg.norm(w, axis=0)[:, None] ** 2 * self._v ** 2).sum(0))
        self._v_norm = np.linalg.norm(self._v, axis=0)

    def check(self, x: np.ndarray, y: np.ndarray) -> ProductCheck:
        """Whether ``y`` is ``x W`` (rows of ``x`` [rows, d_in], ``y`` [rows, d_out])."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[1] != self.d_in \
                or y.shape != (x.shape[0], self.d_out):
            return ProductCheck(False, float("inf"), int(x.shape[0]) if x.ndim else 1)
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not np.isfinite(y64).all():
            return ProductCheck(False, float("inf"), int(x.shape[0]))
        error = np.abs(y64 @ self._v - x64 @ self._wv)
        x_norm = np.linalg.norm(x64, axis=1)[:, None]
        y_norm = np.linalg.norm(y64, axis=1)[:, None]
        bound = TOLERANCE * UNIT_ROUNDOFF * (
            np.sqrt(self.d_in) * x_norm * (self._spread + self._wv_norm)
            + np.sqrt(self.d_out) * y_norm * self._v_norm)
        bound = np.maximum(bound, np.finfo(np.float64).tiny)
        ratio = error / bound
        failed = int((ratio > 1.0).any(axis=1).sum())
        worst = float(ratio.max()) if ratio.size else 0.0
        return ProductCheck(failed == 0, worst, failed)


__all__ = ["CHECK_VECTORS", "TOLERANCE", "FreivaldsCheck", "ProductCheck"]
