"""Attack primitives for ``veilnet audit`` (models/audit.py): fine-tune-like perturbations of the
public weights, a nearest-neighbour matcher that survives them, and token reading from the first
hidden state an ``ee-encoder/1`` node receives (with the key, or keyless by sorting).

Everything here runs on what a node holds (its encrypted shard, the traffic it receives) and on
the public plaintext weights; the true key is never passed in (models/audit.py only scores).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from scipy import sparse
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits  # scikit-learn's dependency

from models.ee_decoder_attack import procrustes
from models.ee_plan import EEPlan

Weights = dict[str, np.ndarray]


# --- perturbations (what a fine-tune does to the weights an attacker holds) -----------------------

def perturb_dense(weights: Mapping[str, np.ndarray], names: Iterable[str], size: float,
                  rng: np.random.Generator) -> Weights:
    """``W + size * rms(W) * N(0, 1)`` on each named tensor (relative size ``size``); the other
    tensors are returned unchanged."""
    out = dict(weights)
    for name in names:
        w = weights[name]
        rms = float(np.sqrt(np.mean(w * w)))
        out[name] = w + size * rms * rng.standard_normal(w.shape)
    return out


def perturb_low_rank(weights: Mapping[str, np.ndarray], names: Iterable[str], rank: int,
                     size: float, rng: np.random.Generator) -> Weights:
    """``W + A B`` (``A B`` of rank ``rank`` and Frobenius norm ``size * |W|``) on each named
    2-D tensor, as a LoRA fine-tune adds; vectors (norms, biases) stay bit-identical."""
    out = dict(weights)
    for name in names:
        w = weights[name]
        if w.ndim != 2:
            continue
        delta = rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal((rank, w.shape[1]))
        out[name] = w + delta * (size * np.linalg.norm(w) / np.linalg.norm(delta))
    return out


# --- matching -------------------------------------------------------------------------------------

def assign(cost: np.ndarray) -> np.ndarray:
    """A one-to-one assignment minimizing ``cost[i, perm[i]]`` (the Hungarian method)."""
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def match_rows(plain: np.ndarray, encrypted: np.ndarray) -> np.ndarray:
    """``perm`` with ``encrypted[j] ~ plain[perm[j]]`` (one-to-one, least total squared distance
    after standardizing each feature over ``plain``'s rows)."""
    mu, sd = plain.mean(axis=0), plain.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    a, b = (plain - mu) / sd, (encrypted - mu) / sd
    cost = np.sum(b * b, axis=1)[:, None] - 2 * b @ a.T + np.sum(a * a, axis=1)[None, :]
    return assign(cost)


def _hidden_ops(plan: EEPlan) -> list[tuple[int, str, str]]:
    """(shard, initializer, role) of every weight carrying the hidden permutation in a way that
    survives the other secret transforms: ``vector`` (LayerNorm scale/bias, residual biases:
    ``v[P]``), ``rows`` (FFN in: ``W1[P, :][:, Q]``, each row's sorted values) and ``cols``
    (FFN out: ``W2[Q, :][:, P]``, each column's sorted values)."""
    out = []
    for index, ops in plan.weight_ops.items():
        for name, op in ops.items():
            if op.op == "last_axis" and op.space == "hidden" and op.kind == "perm":
                out.append((index, name, "vector"))
            elif op.op == "matmul" and op.kind == "perm" and op.in_space == "hidden" \
                    and op.space != "hidden":
                out.append((index, name, "rows"))
            elif op.op == "matmul" and op.space == "hidden" and op.in_kind == "perm" \
                    and op.in_space != "hidden":
                out.append((index, name, "cols"))
    return out


def hidden_features(plan: EEPlan, weights: Mapping[int, Mapping[str, np.ndarray]],
                    ) -> np.ndarray:
    """``[hidden, features]``: for each hidden index, the values a node can line up without
    knowing any other part of the key (see ``_hidden_ops``)."""
    parts = []
    for index, name, role in _hidden_ops(plan):
        w = np.asarray(weights[index][name], np.float64)
        if role == "vector":
            parts.append(w.reshape(-1, 1) if w.ndim == 1 else w.T)
        elif role == "rows":
            parts.append(np.sort(w, axis=1))
        else:
            parts.append(np.sort(w, axis=0).T)
    return np.concatenate(parts, axis=1)


@dataclass
class RobustKey:
    """What NN matching recovered: the hidden permutation, each FFN permutation, each attention
    block's head permutation (as ``enc index -> plain index``)."""

    hidden: np.ndarray
    ffn: dict[str, np.ndarray]
    heads: dict[str, np.ndarray]


def robust_recover(plan: EEPlan, plain: Mapping[int, Mapping[str, np.ndarray]],
                   enc: Mapping[int, Mapping[str, np.ndarray]]) -> RobustKey:
    """Recover the permutations of an ``ee-encoder/1`` key from weights that only approximately
    match the deployment's (a fine-tune of the public model)."""
    perm = match_rows(hidden_features(plan, plain), hidden_features(plan, enc))
    ffn: dict[str, np.ndarray] = {}
    heads: dict[str, np.ndarray] = {}
    for index, ops in plan.weight_ops.items():
        wp, we = plain[index], enc[index]
        by_space: dict[str, dict[str, str]] = {}
        for name, op in ops.items():
            if op.op == "last_axis" and op.space != "hidden" and op.kind == "perm":
                by_space.setdefault(op.space, {})["bias"] = name
            elif op.op == "matmul" and op.kind == "perm" and op.in_space == "hidden" \
                    and op.space != "hidden":
                by_space.setdefault(op.space, {})["in"] = name
            elif op.op == "matmul" and op.space == "hidden" and op.in_space in plan.perm_sizes:
                by_space.setdefault(str(op.in_space), {})["out"] = name
            elif op.op == "matmul" and op.kind == "q" and op.in_space == "hidden":
                heads[op.space] = _head_perm(np.asarray(wp[name])[perm, :],
                                             np.asarray(we[name]), plan.attention_dims[op.space])
        for space, names in by_space.items():
            sig_p = [np.asarray(wp[names["in"]])[perm, :].T]
            sig_e = [np.asarray(we[names["in"]]).T]
            for extra in ("bias", "out"):
                if extra in names:
                    p, e = np.asarray(wp[names[extra]]), np.asarray(we[names[extra]])
                    sig_p.append(p[:, None] if p.ndim == 1 else p[:, perm])
                    sig_e.append(e[:, None] if e.ndim == 1 else e)
            ffn[space] = match_rows(np.concatenate(sig_p, axis=1), np.concatenate(sig_e, axis=1))
    return RobustKey(perm, ffn, heads)


def _head_perm(rows: np.ndarray, encrypted: np.ndarray, dims: tuple[int, int]) -> np.ndarray:
    """Head permutation from ``W_q' ~ W_q[P, :] T_q`` (``T_q`` block-diagonal up to the head
    order): per output slot, the plaintext head whose columns fit the slot's columns with the
    smallest least-squares residual (one-to-one)."""
    heads, d = dims
    resid = np.empty((heads, heads))  # [slot, head]
    for h in range(heads):
        base = rows[:, h * d:(h + 1) * d]
        fit = base @ (np.linalg.pinv(base) @ encrypted)
        err = np.linalg.norm((fit - encrypted).reshape(-1, heads, d), axis=(0, 2))
        resid[:, h] = err / np.linalg.norm(encrypted.reshape(-1, heads, d), axis=(0, 2))
    return assign(resid)


def robust_rotation(plain_gate: np.ndarray, enc_gate: np.ndarray,
                    rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, perm)`` with ``enc_gate ~ Q^T plain_gate[:, perm]`` (``ee-decoder/1``) when the
    plaintext weights are only close to the deployment's. The Gram matrix of the columns is
    ``Q``-free (``P^T B^T B P``), so each column's sorted inner products with all the others is
    a signature to match by nearest neighbour; Procrustes on the matched columns gives ``Q``,
    then cosine matching (one-to-one) and Procrustes again refine both."""
    perm = match_rows(np.sort(plain_gate.T @ plain_gate, axis=1),
                      np.sort(enc_gate.T @ enc_gate, axis=1))
    bn = plain_gate / np.linalg.norm(plain_gate, axis=0)
    rot = procrustes(plain_gate[:, perm].T, enc_gate.T)
    for _ in range(rounds):
        back = rot @ enc_gate
        perm = assign(-(back / np.linalg.norm(back, axis=0)).T @ bn)
        rot = procrustes(plain_gate[:, perm].T, enc_gate.T)
    return rot, perm


# --- reading tokens from the first hidden state (ee-encoder/1) ------------------------------------

@dataclass
class EncoderEmbeddings:
    """The public embedding block of a BERT head: ``LayerNorm(word + position + token_type[0])``."""

    word: np.ndarray
    position: np.ndarray
    token_type: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float
    _base: np.ndarray | None = field(default=None, repr=False)

    NAMES = ("embeddings.word", "embeddings.position", "embeddings.token_type",
             "embeddings.ln.weight", "embeddings.ln.bias")

    @classmethod
    def from_head(cls, head: onnx.ModelProto) -> EncoderEmbeddings:
        w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in head.graph.initializer}
        eps = next(a.f for n in head.graph.node if n.op_type == "LayerNormalization"
                   for a in n.attribute if a.name == "epsilon")
        return cls(*(w[n] for n in cls.NAMES), float(eps))

    def weights(self) -> Weights:
        return dict(zip(self.NAMES, (self.word, self.position, self.token_type, self.gamma,
                                     self.beta), strict=True))

    def replaced(self, w: Mapping[str, np.ndarray]) -> EncoderEmbeddings:
        return EncoderEmbeddings(*(np.asarray(w[n]) for n in self.NAMES), self.eps)

    def at(self, t: int) -> np.ndarray:
        """Every vocabulary entry's first hidden state at position ``t``, float32 ``[V, d]``."""
        if self._base is None:
            self._base = (self.word + self.token_type[0]).astype(np.float32)
        x = self._base + self.position[t].astype(np.float32)
        x -= x.mean(axis=1, keepdims=True)
        x /= np.sqrt(np.mean(x * x, axis=1, keepdims=True) + np.float32(self.eps))
        x *= self.gamma.astype(np.float32)
        x += self.beta.astype(np.float32)
        return x


def _nearest(observed: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    dist = np.sum(candidates * candidates, axis=1)[None, :] - 2 * observed @ candidates.T
    return np.argmin(dist, axis=1)


def read_encoder_tokens(hidden: np.ndarray, valid: np.ndarray, emb: EncoderEmbeddings,
                        sort: bool) -> np.ndarray:
    """Token ids ``[batch, seq]`` read from first hidden states ``[batch, seq, d]`` (-1 where
    ``valid`` is false, i.e. padding, which the node sees in the attention bias). ``sort=False``:
    the states are in plaintext order (decrypted with a recovered permutation), the nearest
    candidate wins; ``sort=True``: keyless, each state's sorted values against each candidate's."""
    batch, seq, _ = hidden.shape
    tokens = np.full((batch, seq), -1, dtype=np.int64)
    for t in range(seq):
        rows = np.flatnonzero(valid[:, t])
        if rows.size == 0:
            continue
        candidates = emb.at(t)
        observed = hidden[rows, t].astype(np.float32)
        if sort:
            candidates, observed = np.sort(candidates, axis=1), np.sort(observed, axis=1)
        tokens[rows, t] = _nearest(observed, candidates)
    return tokens


def apply_perm(hidden: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Undo a recovered hidden permutation (``received[..., j] = plain[..., perm[j]]``); a wrong
    ``perm`` gives a wrong, not a failing, decryption."""
    out = np.empty_like(hidden)
    out[..., perm] = hidden
    return out


RIDGE = (1e-3, 1e-1, 1e1, 1e3)  # probe penalties, relative to the mean eigenvalue
PROBE_CHUNK = 256  # rows per block of [rows, classes] scores


class RidgeProbe:
    """Ridge regression of one-hot token ids on a view's rows (with an intercept: the class
    frequencies), fitted on four fifths of the training rows with the penalty that reads the
    other fifth best; predicts the argmax. An infinite penalty (always the most common training
    token) is a candidate too."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
        order = rng.permutation(len(y))
        val, fit = order[:len(y) // 5], order[len(y) // 5:]
        self._fit(x[fit], y[fit])
        scores = {}
        for lam in (*RIDGE, math.inf):
            self._penalty(lam)
            scores[lam] = float(np.mean(self.predict(x[val]) == y[val]))
        self.penalty = max(scores, key=lambda lam: (scores[lam], lam))
        self._penalty(self.penalty)  # kept as fitted on the other four fifths

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        self.classes, cls = np.unique(y, return_inverse=True)
        onehot = sparse.csr_matrix((np.ones(len(y)), (np.arange(len(y)), cls)),
                                   shape=(len(y), len(self.classes)))
        self.bias = np.asarray(onehot.mean(axis=0)).ravel()
        self.mean = x.mean(axis=0)
        xc = x - self.mean
        self._gram = xc.T @ xc
        self._xty = np.asarray((onehot.T @ xc).T)  # [d, classes]
        self._scale = max(float(np.trace(self._gram)) / len(self.mean), 1e-300)

    def _penalty(self, lam: float) -> None:
        if math.isinf(lam):
            self._factor = None
            return
        # one BLAS thread: a threaded factorization of a few hundred rows is up to 15x slower
        # when other processes share the cores, and hardly faster when they do not
        with threadpool_limits(1):
            self._factor = cho_factor(self._gram + lam * self._scale * np.eye(len(self.mean)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``argmax(bias + (x - mean) (X'X + lam I)^-1 X'Y)``, solved per block of rows."""
        if self._factor is None:
            return np.full(len(x), self.classes[np.argmax(self.bias)])
        out = np.empty(len(x), np.int64)
        for start in range(0, len(x), PROBE_CHUNK):
            z = cho_solve(self._factor, (x[start:start + PROBE_CHUNK] - self.mean).T)
            out[start:start + PROBE_CHUNK] = self.classes[np.argmax(z.T @ self._xty + self.bias,
                                                              axis=1)]
        return out


__all__ = ["EncoderEmbeddings", "RidgeProbe", "RobustKey", "apply_perm", "assign",
           "hidden_features", "match_rows", "perturb_dense", "perturb_low_rank",
           "read_encoder_tokens", "robust_recover", "robust_rotation"]
