"""Equivariant-encryption (EE) key material and the tensor transforms it defines.

A key is a set of *spaces*. Each space is a secret invertible transform ``T`` of one feature axis;
an encrypted tensor in that space is ``x' = x @ T`` along that axis.

- ``PermSpace``: ``T`` is a permutation matrix (hidden dimension, FFN intermediate). Applied by
  indexing, so encrypting with it is exact.
- ``AttentionSpace``: a head permutation ``pi`` plus, per head, an invertible ``R`` (query/key mix)
  and ``S`` (value/output mix). Queries live in ``T_q`` (block ``j`` holds head ``pi[j]`` times
  ``R``), keys in ``T_k`` (``R^-T``), values in ``T_v`` (``S``), so ``q' k'^T = q k^T`` per head and
  ``ctx' = ctx T_v``.

The key file (``key.json``) never leaves the client; it is written with mode 0600.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from crypto.csprng import SecureRandom
from errors import InputError

K = TypeVar("K")
KEY_FORMAT = "veilnet-ee-key/1"
# Singular values of the random mixing matrices are drawn log-uniformly from this range, so the
# condition number stays <= 4 and float32 round-off after mixing stays near 1e-6.
_SINGULAR_RANGE = (0.5, 2.0)


class KeyFormatError(InputError):
    """A key file that is not a valid veilnet EE key."""


@dataclass
class PermSpace:
    """A secret permutation of one axis: ``x'[..., j] = x[..., perm[j]]``."""

    perm: np.ndarray

    @property
    def size(self) -> int:
        return int(self.perm.shape[0])

    @property
    def inverse(self) -> np.ndarray:
        inv = np.empty_like(self.perm)
        inv[self.perm] = np.arange(self.size, dtype=self.perm.dtype)
        return inv

    def encrypt(self, x: np.ndarray) -> np.ndarray:
        return x[..., self.perm]

    def decrypt(self, x: np.ndarray) -> np.ndarray:
        return x[..., self.inverse]


@dataclass
class AttentionSpace:
    """Head permutation ``head_perm`` and per-head mixing matrices ``r`` and ``s``."""

    head_perm: np.ndarray  # [heads]
    r: np.ndarray  # [heads, head_dim, head_dim], indexed by original head
    s: np.ndarray  # [heads, head_dim, head_dim]

    @property
    def heads(self) -> int:
        return int(self.head_perm.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.r.shape[1])

    def mixers(self, kind: str) -> np.ndarray:
        """Per-original-head matrices ``M`` of a flat space kind ``q``, ``k`` or ``v``."""
        if kind == "q":
            return self.r
        if kind == "k":
            return np.linalg.inv(self.r).transpose(0, 2, 1)
        if kind == "v":
            return self.s
        raise ValueError(f"unknown attention space kind {kind!r}")

    def matrix(self, kind: str) -> np.ndarray:
        """Dense ``T`` (float64) for the flat ``[heads*head_dim]`` layout of ``kind``."""
        return _block_matrix(self.head_perm, self.mixers(kind))

    def inverse_matrix(self, kind: str) -> np.ndarray:
        """Dense ``T^-1``, built from per-block inverses (no full-matrix inversion)."""
        mix = self.mixers(kind)
        inv_blocks = np.linalg.inv(mix)
        d = self.head_dim
        out = np.zeros((self.heads * d, self.heads * d))
        for j, h in enumerate(self.head_perm):
            out[j * d : (j + 1) * d, h * d : (h + 1) * d] = inv_blocks[h]
        return out


def _block_matrix(head_perm: np.ndarray, mix: np.ndarray) -> np.ndarray:
    heads, d, _ = mix.shape
    out = np.zeros((heads * d, heads * d))
    for j, h in enumerate(head_perm):
        out[h * d : (h + 1) * d, j * d : (j + 1) * d] = mix[h]
    return out


def random_invertible(rng: SecureRandom, n: int) -> np.ndarray:
    """``U diag(s) V^T`` with Haar-random orthogonal U, V and s log-uniform in [0.5, 2]."""
    lo, hi = np.log(_SINGULAR_RANGE[0]), np.log(_SINGULAR_RANGE[1])
    sing = np.exp(lo + (hi - lo) * rng.uniform(n))
    return _random_orthogonal(rng, n) @ np.diag(sing) @ _random_orthogonal(rng, n).T


def _random_orthogonal(rng: SecureRandom, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal((n, n)))
    return q * np.sign(np.diag(r))  # sign fix makes the distribution Haar


@dataclass
class EEKey:
    """All secret spaces of one encrypted deployment, by space id."""

    scheme: str
    spaces: dict[str, PermSpace | AttentionSpace] = field(default_factory=dict)
    deployment: str | None = None  # manifest CID of the deployment this key belongs to

    @classmethod
    def generate(
        cls,
        scheme: str,
        perm_sizes: Mapping[str, int],
        attention_dims: Mapping[str, tuple[int, int]],
        seed: bytes | int | None = None,
    ) -> EEKey:
        """Fresh key material; ``seed`` only for reproducible tests."""
        rng = SecureRandom(seed)
        key = cls(scheme=scheme)
        for sid in sorted(perm_sizes):
            key.spaces[sid] = PermSpace(rng.permutation(perm_sizes[sid]))
        for sid in sorted(attention_dims):
            heads, head_dim = attention_dims[sid]
            r = np.stack([random_invertible(rng, head_dim) for _ in range(heads)])
            s = np.stack([random_invertible(rng, head_dim) for _ in range(heads)])
            key.spaces[sid] = AttentionSpace(rng.permutation(heads), r, s)
        return key

    def perm(self, space_id: str) -> PermSpace:
        space = self.spaces[space_id]
        if not isinstance(space, PermSpace):
            raise KeyError(f"space {space_id!r} is not a permutation space")
        return space

    def attention(self, space_id: str) -> AttentionSpace:
        space = self.spaces[space_id]
        if not isinstance(space, AttentionSpace):
            raise KeyError(f"space {space_id!r} is not an attention space")
        return space

    # --- serialization -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        spaces: dict[str, Any] = {}
        for sid, space in self.spaces.items():
            if isinstance(space, PermSpace):
                spaces[sid] = {"type": "perm", "perm": space.perm.tolist()}
            else:
                spaces[sid] = {
                    "type": "attention",
                    "head_perm": space.head_perm.tolist(),
                    "r": _encode_array(space.r),
                    "s": _encode_array(space.s),
                }
        return {
            "format": KEY_FORMAT,
            "scheme": self.scheme,
            "deployment": self.deployment,
            "spaces": spaces,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EEKey:
        if not isinstance(doc, Mapping):
            raise KeyFormatError("a key file must hold a JSON object")
        if doc.get("format") != KEY_FORMAT:
            raise KeyFormatError(f"not a veilnet EE key (format {doc.get('format')!r})")
        key = cls(scheme=str(doc["scheme"]), deployment=doc.get("deployment"))
        spaces = doc.get("spaces")
        if not isinstance(spaces, Mapping):
            raise KeyFormatError("'spaces' must be an object")
        for sid, raw in spaces.items():
            if raw["type"] == "perm":
                key.spaces[sid] = PermSpace(_checked_perm(raw["perm"], sid))
            elif raw["type"] == "attention":
                key.spaces[sid] = AttentionSpace(
                    _checked_perm(raw["head_perm"], sid),
                    _decode_array(raw["r"]),
                    _decode_array(raw["s"]),
                )
            else:
                raise KeyFormatError(f"space {sid!r}: unknown type {raw['type']!r}")
        return key

    def save(self, path: Path) -> None:
        """Write the key file, created with mode 0600 (it must not exist yet)."""
        save_key_file(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> EEKey:
        return load_key_file(path, cls.from_json)


def save_key_file(path: Path, doc: Mapping[str, Any]) -> None:
    """Write a key document as JSON to a new file created with mode 0600 (never replaced)."""
    data = json.dumps(doc, indent=1).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_key_file(path: Path, parse: Callable[[Any], K]) -> K:
    """Read a JSON key file and ``parse`` it; every failure is a KeyFormatError naming the
    file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise KeyFormatError(f"{path}: cannot read key file: {exc}") from exc
    try:
        return parse(doc)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{path}: {exc}") from exc
    # LookupError: a missing key or index; ArithmeticError: a number numpy cannot hold
    # (OverflowError) or a zero dimension (ZeroDivisionError)
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError,
            RecursionError) as exc:
        raise KeyFormatError(f"{path}: malformed key file: {type(exc).__name__}: {exc}") \
            from exc


def _checked_perm(values: list[int], sid: str) -> np.ndarray:
    perm = np.asarray(values, dtype=np.int64)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.shape[0])):
        raise KeyFormatError(f"space {sid!r}: not a permutation")
    return perm


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"dtype": "float64", "shape": list(a.shape), "data": base64.b64encode(a).decode()}


def _decode_array(doc: Mapping[str, Any]) -> np.ndarray:
    if doc.get("dtype") != "float64":
        raise KeyFormatError(f"unsupported key array dtype {doc.get('dtype')!r}")
    raw = base64.b64decode(doc["data"])
    return np.frombuffer(raw, dtype="<f8").reshape(doc["shape"]).copy()
