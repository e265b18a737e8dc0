"""The known attack on ee-encoder/1: a node that holds the public plaintext weights recovers the key
by matching them against the encrypted weights it was given.

- Hidden permutation ``P``: LayerNorm scale/bias vectors are stored as ``g[P]``; matching the
  columns of all of them (exact float equality) gives ``P``.
- FFN permutations: ``W1' = W1[P, :][:, Q]`` and ``b1' = b1[Q]``; with ``P`` known, matching
  columns of ``W1[P, :]`` stacked on ``b1`` against ``W1'`` gives ``Q``.
- Attention: ``Wq' = Wq[P, :] T_q``; with ``P`` known, ``T_q = lstsq(Wq[P, :], Wq')``. Its block
  structure gives the head permutation, its blocks give ``R``; ``T_v`` gives ``S`` likewise.

It is shipped so the threat model's claim is measured (tests/unit/models/test_ee_attack.py),
not asserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from crypto.ee_key import EEKey
from models.ee_plan import EEPlan


@dataclass
class AttackReport:
    """What fraction of each key part was recovered exactly (or how closely, for matrices)."""

    hidden_perm: float = 0.0
    ffn_perms: dict[str, float] = field(default_factory=dict)
    head_perms: dict[str, float] = field(default_factory=dict)
    r_rel_error: dict[str, float] = field(default_factory=dict)
    s_rel_error: dict[str, float] = field(default_factory=dict)
    recovered_hidden_perm: np.ndarray | None = None

    def summary(self) -> dict[str, float]:
        return {
            "hidden_perm_recovered": self.hidden_perm,
            "ffn_perms_recovered_min": min(self.ffn_perms.values(), default=0.0),
            "head_perms_recovered_min": min(self.head_perms.values(), default=0.0),
            "r_max_rel_error": max(self.r_rel_error.values(), default=float("inf")),
            "s_max_rel_error": max(self.s_rel_error.values(), default=float("inf")),
        }


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def match_columns(plain: np.ndarray, encrypted: np.ndarray) -> np.ndarray:
    """``perm`` with ``encrypted[:, j] == plain[:, perm[j]]``, or -1 where no column matches."""
    index: dict[bytes, int] = {}
    for i in range(plain.shape[1]):
        index.setdefault(plain[:, i].tobytes(), i)
    return np.array([index.get(encrypted[:, j].tobytes(), -1)
                     for j in range(encrypted.shape[1])], dtype=np.int64)


def recover_key(plan: EEPlan, plain_shards: dict[int, onnx.ModelProto],
                encrypted_shards: dict[int, onnx.ModelProto], true_key: EEKey) -> AttackReport:
    """Run the attack on every node shard; score it against ``true_key`` (used only to score).

    ``plan`` supplies which initializer is what (the attacker learns the same from the public
    graph structure, which the encrypted shard shares with the plaintext one)."""
    report = AttackReport()
    weights = {index: (_weights(plain_shards[index]), _weights(encrypted_shards[index]))
               for index in plan.weight_ops}
    hidden_vectors_plain, hidden_vectors_enc = [], []
    for index, ops in plan.weight_ops.items():
        wp, we = weights[index]
        for name, op in ops.items():
            if op.op == "last_axis" and op.space == "hidden" and wp[name].ndim == 1:
                hidden_vectors_plain.append(wp[name])
                hidden_vectors_enc.append(we[name])
    perm = match_columns(np.stack(hidden_vectors_plain), np.stack(hidden_vectors_enc))
    report.recovered_hidden_perm = perm
    report.hidden_perm = float(np.mean(perm == true_key.perm("hidden").perm))
    if np.any(perm < 0):
        return report

    for index, ops in plan.weight_ops.items():
        wp, we = weights[index]
        biases = {op.space + "/" + op.kind: name for name, op in ops.items()
                  if op.op == "last_axis"}
        for name, op in ops.items():
            if op.op != "matmul" or op.in_space != "hidden":
                continue
            rows = wp[name][perm, :]  # what W looks like with the recovered P undone
            if op.kind == "perm":
                if op.space == "hidden":
                    continue
                bias = biases.get(op.space + "/perm")
                plain_sig = np.vstack([rows, wp[bias][None, :]]) if bias else rows
                enc_sig = np.vstack([we[name], we[bias][None, :]]) if bias else we[name]
                q = match_columns(plain_sig, enc_sig)
                report.ffn_perms[op.space] = float(np.mean(q == true_key.perm(op.space).perm))
                continue
            transform = np.linalg.lstsq(rows, we[name], rcond=None)[0]
            _score_attention(report, op.space, op.kind, transform, true_key)
    return report


def _score_attention(report: AttackReport, space: str, kind: str, transform: np.ndarray,
                     true_key: EEKey) -> None:
    attn = true_key.attention(space)
    d, heads = attn.head_dim, attn.heads
    blocks = transform.reshape(heads, d, heads, d)  # [orig head, ., slot, .]
    head_perm = np.argmax(np.linalg.norm(blocks, axis=(1, 3)), axis=0)
    if kind == "q":
        report.head_perms[space] = float(np.mean(head_perm == attn.head_perm))
    recovered = np.stack([blocks[h, :, j, :] for j, h in enumerate(head_perm)])
    truth = np.stack([attn.mixers(kind)[h] for h in attn.head_perm])
    rel = float(np.linalg.norm(recovered - truth) / np.linalg.norm(truth))
    if kind == "q":
        report.r_rel_error[space] = rel
    elif kind == "v":
        report.s_rel_error[space] = rel


def recover_tokens(received_hidden: np.ndarray, attention_bias: np.ndarray,
                   plain_head: onnx.ModelProto) -> np.ndarray:
    """Recover input token ids from the first hidden state a node receives, without the key.

    The hidden state is only permuted, so per token its sorted values equal the sorted values of
    ``LayerNorm(word[v] + position[t] + token_type[0])`` for the true token ``v``. The public head
    shard gives every candidate; the nearest sorted vector wins. Padding positions (visible in the
    attention bias) are returned as -1.
    """
    w = _weights(plain_head)
    eps = next(a.f for n in plain_head.graph.node if n.op_type == "LayerNormalization"
               for a in n.attribute if a.name == "epsilon")
    base = w["embeddings.word"] + w["embeddings.token_type"][0]
    gamma, beta = w["embeddings.ln.weight"], w["embeddings.ln.bias"]
    batch, seq, _ = received_hidden.shape
    tokens = np.full((batch, seq), -1, dtype=np.int64)
    for t in range(seq):
        x = base + w["embeddings.position"][t]
        mu = x.mean(axis=1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
        candidates = np.sort((x - mu) / np.sqrt(var + eps) * gamma + beta, axis=1)
        for b in range(batch):
            if attention_bias[b, 0, 0, t] < 0:
                continue  # padding
            observed = np.sort(received_hidden[b, t].astype(np.float64))
            tokens[b, t] = int(np.argmin(np.sum((candidates - observed) ** 2, axis=1)))
    return tokens
