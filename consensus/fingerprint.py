"""Compact fingerprints of a hop's output tensors, in the spirit of TOPLOC (arXiv 2501.16007).

Per tensor, reshaped to (rows, last_dim), each row keeps its k largest-magnitude values and
their indices, plus the tensor's float64 sum and L2 norm. A client compares the fingerprints of
r replicas instead of r full tensors. Honest nodes differ only by the order of float additions
(thread counts, kernels), which moves values by ~1e-6 relative: the top-k set and its values
survive that, except for a near tie at the k-th place, which the comparison tolerates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FINGERPRINT_VERSION = 1
DEFAULT_K = 8
MAX_K = 256
MAX_TENSORS = 64
MAX_NAME_LEN = 256
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 40
MAX_ENTRIES = 1 << 20  # rows * k over all tensors: at most 8 MiB of idx + val
DTYPES = frozenset("bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 "
                   "float64".split())
_TOP_KEYS = frozenset({"v", "k", "tensors"})
_TENSOR_KEYS = frozenset({"shape", "dtype", "idx", "val", "sum", "l2"})


@dataclass(frozen=True)
class Tolerance:
    """Elementwise rule: |a - b| <= atol + rtol * max(|a|, |b|). Set per deployment."""

    atol: float = 1e-3
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"tolerance {name} must be a finite number >= 0, got {value!r}")


def _rows(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, last_dim); a 0-D or 1-D tensor is one row."""
    if len(shape) <= 1:
        return 1, int(shape[0]) if len(shape) else 1
    return math.prod(int(d) for d in shape[:-1]), int(shape[-1])


def _idx_dtype(last: int) -> str:
    return "<u2" if last <= 1 << 16 else "<u4"


def _close(x: np.ndarray, y: np.ndarray, tol: Tolerance) -> np.ndarray:
    """Elementwise symmetric closeness; a non-finite value only matches the same infinity."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(x) & np.isfinite(y)
        near = np.abs(x - y) <= tol.atol + tol.rtol * np.maximum(np.abs(x), np.abs(y))
    return np.where(finite, near, x == y)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    return k


def fingerprint(outputs: Mapping[str, np.ndarray], k: int = DEFAULT_K) -> dict[str, Any]:
    """Fingerprint of named output tensors (see the module docstring and docs/consensus.md)."""
    _check_k(k)
    tensors: dict[str, Any] = {}
    for name in sorted(outputs):
        arr = np.asarray(outputs[name])
        if arr.dtype.name not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype.name} cannot be fingerprinted")
        rows, last = _rows(arr.shape)
        kk = min(k, last)
        x = arr.astype(np.float64).reshape(rows, last)
        mag = np.abs(x)
        mag[np.isnan(mag)] = np.inf  # a NaN is always selected, so it shows in "val"
        # stable sort: among equal magnitudes the lowest index wins, on every node
        idx = np.sort(np.argsort(-mag, axis=1, kind="stable")[:, :kk], axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            val = np.take_along_axis(x, idx, axis=1).astype("<f4")
            total = float(x.sum())
            l2 = float(np.sqrt(np.sum(x * x)))
        tensors[name] = {"shape": [int(d) for d in arr.shape], "dtype": arr.dtype.name,
                         "idx": idx.astype(_idx_dtype(last)).tobytes(), "val": val.tobytes(),
                         "sum": total, "l2": l2}
    return {"v": FINGERPRINT_VERSION, "k": k, "tensors": tensors}


def fingerprint_bytes(fp: dict[str, Any]) -> int:
    """Encoded size estimate: raw idx + val bytes plus a CBOR-like overhead per field."""
    size = 16  # map header, "v", "k", "tensors"
    for name, t in fp["tensors"].items():
        size += len(t["idx"]) + len(t["val"]) + len(name.encode()) + len(t["dtype"])
        size += 5 * len(t["shape"]) + 2 * 9 + 30  # dims; sum, l2 as float64; keys, headers
    return size


def check_fingerprint(fp: Any) -> dict[str, Any]:
    """Validate a fingerprint received from the network; return a normalised copy."""
    if not isinstance(fp, Mapping):
        raise ValueError("fingerprint must be a map")
    if set(fp) != _TOP_KEYS:
        got = sorted(map(str, fp))
        raise ValueError(f"fingerprint keys must be {sorted(_TOP_KEYS)}, got {got}")
    v, k, tensors = fp["v"], fp["k"], fp["tensors"]
    if isinstance(v, bool) or v != FINGERPRINT_VERSION:
        raise ValueError(f"unsupported fingerprint version {v!r}")
    _check_k(k)
    if not isinstance(tensors, Mapping) or len(tensors) > MAX_TENSORS:
        raise ValueError(f"fingerprint tensors must be a map of at most {MAX_TENSORS} entries")
    out: dict[str, Any] = {}
    entries = 0
    for name in sorted(tensors, key=str):
        t = tensors[name]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise ValueError(f"tensor name {name!r} must be a string of 1..{MAX_NAME_LEN} chars")
        if not isinstance(t, Mapping) or set(t) != _TENSOR_KEYS:
            raise ValueError(f"tensor {name!r} must be a map with keys {sorted(_TENSOR_KEYS)}")
        shape = t["shape"]
        if (not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            raise ValueError(f"tensor {name!r}: shape must be <= {MAX_NDIM} ints >= 0")
        if math.prod(shape) > MAX_ELEMENTS:
            raise ValueError(f"tensor {name!r}: shape {list(shape)} is too large")
        if not isinstance(t["dtype"], str) or t["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {t['dtype']!r}")
        rows, last = _rows(shape)
        kk = min(k, last)
        entries += rows * kk
        if entries > MAX_ENTRIES:
            raise ValueError(f"fingerprint has more than {MAX_ENTRIES} top-k entries")
        raw = {}
        for field, size in (("idx", np.dtype(_idx_dtype(last)).itemsize), ("val", 4)):
            if not isinstance(t[field], bytes | bytearray | memoryview):
                raise ValueError(f"tensor {name!r}: {field} must be bytes")
            raw[field] = bytes(t[field])
            if len(raw[field]) != rows * kk * size:
                raise ValueError(f"tensor {name!r}: {field} has {len(raw[field])} bytes, "
                                 f"expected {rows}*{kk}*{size}")
        if rows * kk:
            idx = np.frombuffer(raw["idx"], dtype=_idx_dtype(last)).reshape(rows, kk)
            if int(idx.max()) >= last:
                raise ValueError(f"tensor {name!r}: an index is >= last dimension {last}")
            if kk > 1 and not bool(np.all(np.diff(idx.astype(np.int64), axis=1) > 0)):
                raise ValueError(f"tensor {name!r}: indices must be strictly ascending per row")
        for field in ("sum", "l2"):
            if isinstance(t[field], bool) or not isinstance(t[field], int | float):
                raise ValueError(f"tensor {name!r}: {field} must be a number")
        if t["l2"] < 0:
            raise ValueError(f"tensor {name!r}: l2 must not be negative")
        out[name] = {"shape": list(shape), "dtype": t["dtype"], **raw, "sum": float(t["sum"]),
                     "l2": float(t["l2"])}
    return {"v": FINGERPRINT_VERSION, "k": k, "tensors": out}


def _decode(t: dict[str, Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    rows, last = _rows(t["shape"])
    kk = min(k, last)
    idx = np.frombuffer(t["idx"], dtype=_idx_dtype(last)).reshape(rows, kk).astype(np.int64)
    val = np.frombuffer(t["val"], dtype="<f4").reshape(rows, kk).astype(np.float64)
    return idx, val


def _rows_agree(name: str, ta: dict[str, Any], tb: dict[str, Any], k: int,
                tol: Tolerance) -> tuple[bool, str]:
    ia, va = _decode(ta, k)
    ib, vb = _decode(tb, k)
    kk = ia.shape[1]
    if kk == 0:
        return True, ""
    eq = ia[:, :, None] == ib[:, None, :]  # (rows, k, k): a's i-th index equals b's j-th
    in_b, in_a = eq.any(axis=2), eq.any(axis=1)
    short = np.nonzero(in_b.sum(axis=1) < kk - 1)[0]
    if short.size:
        r = int(short[0])
        return False, f"tensor {name!r} row {r}: fewer than {kk - 1} of {kk} top indices shared"
    vb_at_a = np.take_along_axis(vb, eq.argmax(axis=2), axis=1)
    bad = np.nonzero((in_b & ~_close(va, vb_at_a, tol)).any(axis=1))[0]
    if bad.size:
        return False, f"tensor {name!r} row {int(bad[0])}: top-k values differ"
    # An index in a's top-k but not in b's: b's value there is <= b's k-th largest magnitude
    # m_b, so agreeing tensors need |a| <= (m_b + atol) / (1 - rtol) (~ m_b (1 + rtol) + atol).
    # m_b <= b's smallest shared |value|: this is exactly a near tie at the k-th place.
    for here, there, vals, other in ((in_b, "first", va, vb), (in_a, "second", vb, va)):
        kth = np.abs(other).min(axis=1, keepdims=True)
        bound = (kth + tol.atol) / (1 - tol.rtol) if tol.rtol < 1 else np.inf
        bad = np.nonzero((~here & ~(np.abs(vals) <= bound)).any(axis=1))[0]
        if bad.size:
            return False, (f"tensor {name!r} row {int(bad[0])}: the {there} answer's unshared "
                           "top index is not a near tie")
    return True, ""


def fingerprints_agree(a: dict[str, Any], b: dict[str, Any], tol: Tolerance) -> tuple[bool, str]:
    """(True, "") when the fingerprints may come from agreeing tensors, else (False, reason)."""
    try:
        a, b = check_fingerprint(a), check_fingerprint(b)
    except ValueError as exc:
        return False, f"malformed fingerprint: {exc}"
    if a["k"] != b["k"]:
        return False, f"k differs: {a['k']} != {b['k']}"
    if set(a["tensors"]) != set(b["tensors"]):
        return False, f"tensor names differ: {sorted(a['tensors'])} != {sorted(b['tensors'])}"
    for name in sorted(a["tensors"]):
        ta, tb = a["tensors"][name], b["tensors"][name]
        if ta["shape"] != tb["shape"] or ta["dtype"] != tb["dtype"]:
            return False, (f"tensor {name!r}: {ta['dtype']}{ta['shape']} != "
                           f"{tb['dtype']}{tb['shape']}")
        # a NaN element makes the sum NaN; a forged NaN in "val" fails _close in _rows_agree
        if any(math.isnan(x) for x in (ta["sum"], tb["sum"], ta["l2"], tb["l2"])):
            return False, f"tensor {name!r}: NaN"
        # Sum and L2 bounds implied by the elementwise rule |a_i - b_i| <= atol + rtol*M_i with
        # M_i = max(|a_i|, |b_i|) over n elements, using ||M||_2 <= hypot(||a||, ||b||) = H and
        # Cauchy-Schwarz (sum M_i <= sqrt(n) ||M||_2):
        #   |sum a - sum b| <= sum |a_i - b_i| <= n*atol + rtol*sqrt(n)*H
        #   | ||a|| - ||b|| | <= ||a - b||_2 <= sqrt(n)*atol + rtol*H       (triangle inequality)
        # so tensors that pass tensors_agree never fail these two checks.
        n = math.prod(ta["shape"])
        h = math.hypot(ta["l2"], tb["l2"])
        checks = (("sum", ta["sum"], tb["sum"], n * tol.atol + tol.rtol * math.sqrt(n) * h),
                  ("l2", ta["l2"], tb["l2"], math.sqrt(n) * tol.atol + tol.rtol * h))
        for what, x, y, bound in checks:
            same = x == y or (math.isfinite(x) and math.isfinite(y) and abs(x - y) <= bound)
            if not same:
                return False, f"tensor {name!r}: {what} {x!r} vs {y!r} (bound {bound:.3g})"
        ok, reason = _rows_agree(name, ta, tb, a["k"], tol)
        if not ok:
            return False, reason
    return True, ""


def tensors_agree(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                  tol: Tolerance) -> tuple[bool, str]:
    """Full comparison: same names, shapes, dtypes; every element within tol; NaN disagrees."""
    if set(a) != set(b):
        return False, f"tensor names differ: {sorted(a)} != {sorted(b)}"
    for name in sorted(a):
        xa, xb = np.asarray(a[name]), np.asarray(b[name])
        if xa.shape != xb.shape or xa.dtype != xb.dtype:
            return False, (f"tensor {name!r}: {xa.dtype}{list(xa.shape)} != "
                           f"{xb.dtype}{list(xb.shape)}")
        if xa.dtype.name not in DTYPES:
            return False, f"tensor {name!r}: unsupported dtype {xa.dtype.name}"
        fa, fb = xa.astype(np.float64), xb.astype(np.float64)
        ok = _close(fa, fb, tol)  # False wherever either side is NaN
        if not ok.all():
            at = np.unravel_index(int((~ok).argmax()), ok.shape)
            return False, (f"tensor {name!r} at {tuple(int(i) for i in at)}: "
                           f"{fa[at]!r} vs {fb[at]!r}")
    return True, ""
