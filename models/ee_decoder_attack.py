"""Attacks on ``ee-decoder/1`` that work, shipped so docs/threat-model.md measures them
(tests/unit/models/test_ee_decoder_attack.py) instead of asserting them.

1. Key recovery with the public weights (``recover_shard_key``). A node holds its encrypted
   shard; anyone holds the public plaintext weights. Per layer, with ``B = diag(g) W`` the
   plaintext projections with the norm folded in:

   - rotation ``Q``: ``W_gate' = Q^T B_gate P`` (P a column permutation). ``Q^T`` keeps column
     norms, so sorting the norms pairs most columns; orthogonal Procrustes on the pairs gives
     ``Q``; matching the columns of ``Q W_gate'`` against ``B_gate`` by cosine then gives ``P``
     exactly, and Procrustes again on all of them refines ``Q``;
   - FFN scales: ``Q W_up' = B_up P diag(sigma)``, one ratio per column;
   - heads, RoPE factors, value mixing: ``Q W_q' = B_q[:, heads] M``; least squares of each
     query slot against each plaintext head gives the head (smallest residual) and ``M``, whose
     2x2 blocks are the complex factors; keys and values the same way (``S`` from ``W_v'``).

2. Reading the tokens (``nearest_tokens``): the first node receives ``E[ids] Q_1``; with ``Q_1``
   it takes the nearest row of the public embedding table.

3. Without the key (``tokens_by_norm``): ``|x Q| = |x|``, and the row norms of SmolLM2's
   embedding table are nearly all distinct, so the norm of each row a node receives names its
   token. ``rotation_from_traffic`` then fits ``Q_1`` by Procrustes on the tokens so named:
   exact once the node has seen ``d`` (576) distinct tokens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from models.ee_decoder import LAYER_WEIGHTS, rope_matrix, weight_name
from models.ee_decoder_key import DecoderDims, DecoderKey

MATCH_TOLERANCE = 1e-3  # a recovered number or matrix counts if its relative error is below this


@dataclass
class RecoveredLayer:
    ffn_perm: np.ndarray
    ffn_scale: np.ndarray
    kv_perm: np.ndarray
    q_perm: np.ndarray
    rope_factor: np.ndarray
    value_mix: np.ndarray


@dataclass
class RecoveredShard:
    rotation: np.ndarray
    layers: dict[int, RecoveredLayer] = field(default_factory=dict)
    seconds: float = 0.0


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The ``blk.*`` weights of a shard, float64."""
    return blk_weights({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})


def blk_weights(initializers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``blk.*`` weights among a shard's initializers, float64."""
    return {name: np.asarray(value, np.float64) for name, value in initializers.items()
            if name.startswith("blk.")}


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal ``X`` minimizing ``|source X - target|`` (rows are paired vectors)."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return u @ vt


def _match_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each column of ``a``, the column of ``b`` with the largest cosine."""
    an = a / np.linalg.norm(a, axis=0, keepdims=True)
    bn = b / np.linalg.norm(b, axis=0, keepdims=True)
    return np.argmax(an.T @ bn, axis=1)


def recover_rotation(plain_gate: np.ndarray, enc_gate: np.ndarray,
                     rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, perm)`` with ``enc_gate ~ Q^T plain_gate[:, perm]`` (``plain_gate`` with the norm
    folded in)."""
    order_enc = np.argsort(np.linalg.norm(enc_gate, axis=0))
    order_plain = np.argsort(np.linalg.norm(plain_gate, axis=0))
    perm = np.empty_like(order_enc)
    perm[order_enc] = order_plain  # pair columns by the rank of their norm
    for _ in range(rounds):
        # rows: enc^T = plain[:, perm]^T Q, so Q = procrustes(plain[:, perm]^T, enc^T)
        rot = procrustes(plain_gate[:, perm].T, enc_gate.T)
        perm = _match_columns(rot @ enc_gate, plain_gate)
    return procrustes(plain_gate[:, perm].T, enc_gate.T), perm


def _fit_blocks(base: np.ndarray, target: np.ndarray, hd: int) -> tuple[np.ndarray, np.ndarray]:
    """For each ``hd``-wide column block of ``target``: the block of ``base`` it is a linear map
    of (least squares, smallest relative residual) and that map."""
    n_base, n_target = base.shape[1] // hd, target.shape[1] // hd
    pinvs = [np.linalg.pinv(base[:, h * hd:(h + 1) * hd]) for h in range(n_base)]
    picks, maps = [], []
    for s in range(n_target):
        block = target[:, s * hd:(s + 1) * hd]
        fits = [p @ block for p in pinvs]
        resid = [np.linalg.norm(base[:, h * hd:(h + 1) * hd] @ m - block)
                 for h, m in enumerate(fits)]
        best = int(np.argmin(resid))
        picks.append(best)
        maps.append(fits[best])
    return np.array(picks), np.stack(maps)


def _complex_of(m: np.ndarray) -> np.ndarray:
    """The per-pair complex factors of a ``rope_matrix``-shaped ``m`` (averaging its blocks)."""
    half = m.shape[0] // 2
    idx = np.arange(half)
    real = (m[idx, idx] + m[idx + half, idx + half]) / 2
    imag = (m[idx, idx + half] - m[idx + half, idx]) / 2
    return real + 1j * imag


def recover_layer(plain: Mapping[str, np.ndarray], enc: Mapping[str, np.ndarray], layer: int,
                  rotation: np.ndarray, dims: DecoderDims) -> RecoveredLayer:
    p = {k: plain[weight_name(layer, k)] for k in LAYER_WEIGHTS}
    e = {k: enc[weight_name(layer, k)] for k in LAYER_WEIGHTS}
    hd, group = dims.head_dim, dims.group

    def folded(kind: str, norm: str) -> np.ndarray:
        return p[norm][:, None] * p[kind]

    gate, up = folded("ffn_gate", "ffn_norm"), folded("ffn_up", "ffn_norm")
    ffn_perm = _match_columns(rotation @ e["ffn_gate"], gate)
    up_back = rotation @ e["ffn_up"]
    base = up[:, ffn_perm]
    scale = np.sum(up_back * base, axis=0) / np.sum(base * base, axis=0)

    heads, q_maps = _fit_blocks(folded("attn_q", "attn_norm"), rotation @ e["attn_q"], hd)
    kv_perm, _ = _fit_blocks(folded("attn_k", "attn_norm"), rotation @ e["attn_k"], hd)
    _, value_mix = _fit_blocks(folded("attn_v", "attn_norm"), rotation @ e["attn_v"], hd)
    q_perm = (heads % group).reshape(dims.n_kv_heads, group)
    factor = np.stack([_complex_of(q_maps[j * group]) for j in range(dims.n_kv_heads)])
    return RecoveredLayer(ffn_perm, scale, kv_perm, q_perm, factor, value_mix)


def recover_shard_key(plain: Mapping[str, np.ndarray], enc: Mapping[str, np.ndarray],
                      layers: list[int], dims: DecoderDims) -> RecoveredShard:
    """The whole key of one node shard from its encrypted weights and the public ones."""
    start = time.perf_counter()
    first = layers[0]
    gate = plain[weight_name(first, "ffn_norm")][:, None] * plain[weight_name(first, "ffn_gate")]
    rotation, _ = recover_rotation(gate, enc[weight_name(first, "ffn_gate")])
    out = RecoveredShard(rotation)
    for i in layers:
        out.layers[i] = recover_layer(plain, enc, i, rotation, dims)
    out.seconds = time.perf_counter() - start
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def score_shard(recovered: RecoveredShard, key: DecoderKey, index: int) -> dict[str, float]:
    """Fraction of each key part recovered (``true key`` used only to score)."""
    shard = key.shard(index)
    rot_err = float(np.linalg.norm(recovered.rotation - shard.rotation)
                    / np.linalg.norm(shard.rotation))
    parts: dict[str, list[float]] = {k: [] for k in (
        "ffn_perm", "ffn_scale", "kv_perm", "q_perm", "rope_factor", "value_mix")}
    for i, got in recovered.layers.items():
        true = key.layers[i]
        parts["ffn_perm"].append(float(np.mean(got.ffn_perm == true.ffn_perm)))
        parts["ffn_scale"].append(float(np.mean(_rel(got.ffn_scale, true.ffn_scale)
                                                < MATCH_TOLERANCE)))
        parts["kv_perm"].append(float(np.mean(got.kv_perm == true.kv_perm)))
        parts["q_perm"].append(float(np.mean(got.q_perm == true.q_perm)))
        parts["rope_factor"].append(float(np.mean(_rel(got.rope_factor, true.rope_factor)
                                                  < MATCH_TOLERANCE)))
        mix_err = (np.linalg.norm(got.value_mix - true.value_mix, axis=(1, 2))
                   / np.linalg.norm(true.value_mix, axis=(1, 2)))
        parts["value_mix"].append(float(np.mean(mix_err < MATCH_TOLERANCE)))
    scores = {k: float(np.mean(v)) for k, v in parts.items()}
    scores["rotation"] = 1.0 if rot_err < MATCH_TOLERANCE else 0.0
    scores["rotation_rel_error"] = rot_err
    scores["seconds"] = recovered.seconds
    return scores


def check_recovered_layer(plain: Mapping[str, np.ndarray], enc: Mapping[str, np.ndarray],
                          layer: int, rotation: np.ndarray, got: RecoveredLayer,
                          dims: DecoderDims) -> float:
    """Relative error of the encrypted q weights rebuilt from the recovered key (an attacker's
    own check, needing no true key)."""
    hd, group = dims.head_dim, dims.group
    base = rotation.T @ (plain[weight_name(layer, "attn_norm")][:, None]
                         * plain[weight_name(layer, "attn_q")])
    heads = (got.kv_perm[:, None] * group + got.q_perm).reshape(-1)
    rebuilt = np.concatenate([base[:, h * hd:(h + 1) * hd]
                              @ rope_matrix(got.rope_factor[s // group])
                              for s, h in enumerate(heads)], axis=1)
    target = enc[weight_name(layer, "attn_q")]
    return float(np.linalg.norm(rebuilt - target) / np.linalg.norm(target))


NEAREST_BLOCK = 512  # rows per [rows, vocab] float64 distance block (512 x 49152: 200 MB)


def nearest_tokens(hidden: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row index of ``table`` nearest (L2) to each row of ``hidden`` ``[..., d]``, in blocks
    of NEAREST_BLOCK rows so memory stays bounded whatever the number of rows."""
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(np.float64)
    norms = np.sum(table * table, axis=1)[None, :]
    out = np.empty(len(flat), np.int64)
    for i in range(0, len(flat), NEAREST_BLOCK):
        out[i:i + NEAREST_BLOCK] = np.argmin(norms - 2 * flat[i:i + NEAREST_BLOCK] @ table.T,
                                             axis=1)
    return out.reshape(hidden.shape[:-1])


def tokens_by_norm(received: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Keyless: the token whose embedding norm is nearest to each received row's norm."""
    norms = np.linalg.norm(table.astype(np.float64), axis=1)
    order = np.argsort(norms)
    sorted_norms = norms[order]
    got = np.linalg.norm(received.reshape(-1, received.shape[-1]).astype(np.float64), axis=1)
    pos = np.clip(np.searchsorted(sorted_norms, got), 1, len(sorted_norms) - 1)
    left = np.abs(sorted_norms[pos - 1] - got) <= np.abs(sorted_norms[pos] - got)
    return order[np.where(left, pos - 1, pos)].reshape(received.shape[:-1])


def rotation_from_traffic(received: np.ndarray, table: np.ndarray,
                          rounds: int = 2) -> np.ndarray:
    """Keyless: ``Q`` fitted (Procrustes) to the distinct received rows and the tokens their
    norms name (``tokens_by_norm``); each further round re-guesses the tokens as the nearest
    rows under the fit and refits (so a few wrong guesses do not spoil it). Exact once the rows
    span the space (``d`` distinct tokens); with fewer, exact on their span only."""
    rows = np.unique(received.reshape(-1, received.shape[-1]).astype(np.float64), axis=0)
    guess = tokens_by_norm(rows, table)
    fit = procrustes(table[guess].astype(np.float64), rows)
    for _ in range(rounds - 1):
        guess = nearest_tokens(rows @ fit.T, table)
        fit = procrustes(table[guess].astype(np.float64), rows)
    return fit


__all__ = [
    "MATCH_TOLERANCE",
    "NEAREST_BLOCK",
    "RecoveredLayer",
    "RecoveredShard",
    "blk_weights",
    "check_recovered_layer",
    "nearest_tokens",
    "procrustes",
    "recover_layer",
    "recover_rotation",
    "recover_shard_key",
    "rotation_from_traffic",
    "score_shard",
    "tokens_by_norm",
    "weights_of",
]
