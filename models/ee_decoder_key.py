"""Key material of ``ee-decoder/1`` (equivariant encryption of llama-style decoder shards) and
its key file ``veilnet-ee-decoder-key/1``.

Per node shard ``s``: a Haar-random orthogonal ``rotation`` ``Q_s`` (``d x d``) of the residual
stream (``x' = x Q_s``). Per decoder layer, every array indexed by the *slot* the node sees:

- ``ffn_perm[j]``: the original FFN channel in slot ``j``; ``ffn_scale[j]``: the nonzero factor
  on the up projection of slot ``j`` (undone in the down projection);
- ``kv_perm[j]``: the original KV head in slot ``j``; ``q_perm[j, t]``: the original query head,
  within that KV head's group, in position ``t`` of slot ``j``'s group;
- ``rope_factor[j, p]``: complex factor ``c`` on RoPE pair ``p`` (dims ``p`` and
  ``p + head_dim/2``) of the queries of slot ``j``'s group; the keys get ``1/conj(c)``;
- ``value_mix[j]``: invertible ``S`` (``head_dim x head_dim``) on the values of slot ``j``;
  ``S^-1`` is folded into the output projection rows of its query heads.

Random draws come from ``crypto.csprng.SecureRandom`` (ChaCha20, OS-seeded; ``seed`` only for
reproducible tests). The key file is JSON with float arrays base64 little-endian float64, written
with mode 0600 into DEPLOY/client/; it never goes into a manifest or a node shard.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crypto.csprng import SecureRandom
from crypto.ee_key import KeyFormatError, load_key_file, random_invertible, save_key_file

KEY_FORMAT = "veilnet-ee-decoder-key/1"
# |rope factor| and |ffn scale| are drawn log-uniformly from this range (as crypto/ee_key.py's
# singular values), so float32 round-off after the transform stays near plaintext's.
FACTOR_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class DecoderDims:
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def half(self) -> int:
        return self.head_dim // 2

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DecoderDims:
        """From a manifest's ``config`` (family ``llama-decoder``)."""
        return cls(int(cfg["hidden_size"]), int(cfg["num_heads"]), int(cfg["num_kv_heads"]),
                   int(cfg["head_dim"]), int(cfg["intermediate_size"]))


@dataclass
class LayerKey:
    ffn_perm: np.ndarray  # [ffn] int
    ffn_scale: np.ndarray  # [ffn] float, nonzero
    kv_perm: np.ndarray  # [kv] int
    q_perm: np.ndarray  # [kv, group] int
    rope_factor: np.ndarray  # [kv, half] complex
    value_mix: np.ndarray  # [kv, head_dim, head_dim]

    def query_heads(self, dims: DecoderDims) -> np.ndarray:
        """Original query head in each query slot (slot ``j * group + t``)."""
        return (self.kv_perm[:, None] * dims.group + self.q_perm).reshape(-1)


@dataclass
class ShardKey:
    index: int  # the node shard's index in the deployment manifest
    layers: list[int]
    rotation: np.ndarray  # [d, d] orthogonal


@dataclass
class DecoderKey:
    dims: DecoderDims
    shards: list[ShardKey] = field(default_factory=list)
    layers: dict[int, LayerKey] = field(default_factory=dict)
    scheme: str = "ee-decoder/1"
    deployment: str | None = None  # manifest CID of the deployment this key belongs to

    @classmethod
    def generate(cls, dims: DecoderDims, shards: Sequence[tuple[int, Sequence[int]]],
                 seed: bytes | int | None = None) -> DecoderKey:
        """Fresh key for node shards given as (deployment index, layers); ``seed`` for tests."""
        rng = SecureRandom(seed)
        key = cls(dims)
        for index, layers in shards:
            key.shards.append(ShardKey(index, list(layers), random_orthogonal(rng, dims.d_model)))
        for _, layers in shards:
            for i in layers:
                key.layers[i] = _layer_key(rng, dims)
        return key

    def shard(self, index: int) -> ShardKey:
        for s in self.shards:
            if s.index == index:
                return s
        raise KeyError(f"the key has no node shard {index}")

    # --- serialization ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = self.dims
        return {
            "format": KEY_FORMAT, "scheme": self.scheme, "deployment": self.deployment,
            "dims": {"d_model": d.d_model, "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads,
                     "head_dim": d.head_dim, "ffn": d.ffn},
            "shards": [{"index": s.index, "layers": s.layers, "rotation": _enc(s.rotation)}
                       for s in self.shards],
            "layers": {str(i): {
                "ffn_perm": lk.ffn_perm.tolist(), "ffn_scale": _enc(lk.ffn_scale),
                "kv_perm": lk.kv_perm.tolist(), "q_perm": lk.q_perm.tolist(),
                "rope_factor": _enc(np.stack([lk.rope_factor.real, lk.rope_factor.imag], -1)),
                "value_mix": _enc(lk.value_mix)} for i, lk in sorted(self.layers.items())},
        }

    @classmethod
    def from_json(cls, doc: Any) -> DecoderKey:
        if not isinstance(doc, Mapping):
            raise KeyFormatError("a key file must hold a JSON object")
        if doc.get("format") != KEY_FORMAT:
            raise KeyFormatError(f"not a veilnet ee-decoder key (format {doc.get('format')!r},"
                                 f" expected {KEY_FORMAT!r})")
        raw = doc["dims"]
        dims = DecoderDims(*(int(raw[k]) for k in ("d_model", "n_heads", "n_kv_heads",
                                                   "head_dim", "ffn")))
        key = cls(dims, scheme=str(doc["scheme"]), deployment=doc.get("deployment"))
        for s in doc["shards"]:
            rot = _dec(s["rotation"], (dims.d_model, dims.d_model), "rotation")
            if not np.allclose(rot @ rot.T, np.eye(dims.d_model), atol=1e-8):
                raise KeyFormatError(f"shard {s['index']}: rotation is not orthogonal")
            key.shards.append(ShardKey(int(s["index"]), [int(i) for i in s["layers"]], rot))
        kv, g, hd = dims.n_kv_heads, dims.group, dims.head_dim
        for name, lk in doc["layers"].items():
            where = f"layer {name}"
            factor = _dec(lk["rope_factor"], (kv, dims.half, 2), where)
            layer = LayerKey(
                _perm(lk["ffn_perm"], dims.ffn, where),
                _dec(lk["ffn_scale"], (dims.ffn,), where),
                _perm(lk["kv_perm"], kv, where),
                np.stack([_perm(p, g, where) for p in lk["q_perm"]]).reshape(kv, g),
                factor[..., 0] + 1j * factor[..., 1],
                _dec(lk["value_mix"], (kv, hd, hd), where))
            if np.any(layer.ffn_scale == 0) or np.any(layer.rope_factor == 0):
                raise KeyFormatError(f"{where}: zero scale or rope factor")
            key.layers[int(name)] = layer
        missing = {i for s in key.shards for i in s.layers} - set(key.layers)
        if missing:
            raise KeyFormatError(f"no key for layers {sorted(missing)}")
        return key

    def save(self, path: Path) -> None:
        """Write the key file, created with mode 0600 (it must not exist yet)."""
        save_key_file(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> DecoderKey:
        return load_key_file(path, cls.from_json)


def random_orthogonal(rng: SecureRandom, n: int) -> np.ndarray:
    """A Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal((n, n)))
    return q * np.sign(np.diag(r))


def _log_uniform(rng: SecureRandom, n: int) -> np.ndarray:
    lo, hi = np.log(FACTOR_RANGE[0]), np.log(FACTOR_RANGE[1])
    return np.exp(lo + (hi - lo) * rng.uniform(n))


def _layer_key(rng: SecureRandom, dims: DecoderDims) -> LayerKey:
    kv = dims.n_kv_heads
    sign = np.where(rng.uniform(dims.ffn) < 0.5, -1.0, 1.0)
    scale = sign * _log_uniform(rng, dims.ffn)
    ffn_perm = rng.permutation(dims.ffn)
    kv_perm = rng.permutation(kv)
    q_perm = np.stack([rng.permutation(dims.group) for _ in range(kv)])
    magnitude = _log_uniform(rng, kv * dims.half).reshape(kv, dims.half)
    phase = 2 * np.pi * rng.uniform((kv, dims.half))
    mix = np.stack([random_invertible(rng, dims.head_dim) for _ in range(kv)])
    return LayerKey(ffn_perm, scale, kv_perm, q_perm, magnitude * np.exp(1j * phase), mix)


def _perm(values: Any, n: int, where: str) -> np.ndarray:
    perm = np.asarray(values, dtype=np.int64)
    if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
        raise KeyFormatError(f"{where}: not a permutation of {n}")
    return perm


def _enc(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"dtype": "float64", "shape": list(a.shape), "data": base64.b64encode(a).decode()}


def _dec(doc: Mapping[str, Any], shape: tuple[int, ...], where: str) -> np.ndarray:
    if doc.get("dtype") != "float64" or tuple(doc.get("shape", ())) != shape:
        raise KeyFormatError(f"{where}: expected a float64 array of shape {list(shape)}")
    a = np.frombuffer(base64.b64decode(doc["data"]), dtype="<f8")
    if a.size != int(np.prod(shape)) or not np.all(np.isfinite(a)):
        raise KeyFormatError(f"{where}: array data does not match its shape or is not finite")
    return a.reshape(shape).copy()


__all__ = ["FACTOR_RANGE", "KEY_FORMAT", "DecoderDims", "DecoderKey", "LayerKey", "ShardKey",
           "random_orthogonal"]
