"""CKKS homomorphic encryption (TenSEAL) for polynomial MLP shards: ``encryption: ckks``.

The client creates the context and keeps the secret key; nodes get the public context
(serialized without the secret key, and without Galois keys: the evaluation below needs no
rotations) and ciphertexts, and evaluate the shard with their plaintext weights.

Parameters (``PARAMS``), chosen for the digits MLP, multiplicative depth 3 (x·W1, square, ·W2):
polynomial modulus degree 8192, coefficient modulus 40+30+30+30+40 = 170 bits (the HE
standard's 128-bit security bound for degree 8192 is 218 bits), scale 2^30. Three 30-bit primes
give the three rescalings; the 40-bit first prime leaves 10 bits above the scale for the
results, so |values| stay below 2^9 (the digits logits are below 80).

Packing ("batch packing where it pays"): samples go into the slots, features into separate
ciphertexts. A batch of N <= 4096 samples is 64 ciphertexts (one per input feature, slot s =
sample s), so one evaluation serves the whole batch with only plaintext-scalar products,
additions and one square per hidden unit (no rotations, hence no Galois keys). One sample costs
as much as 4096; the node's time per sample falls with the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from errors import InputError

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (40, 30, 30, 30, 40)
SCALE_BITS = 30
MAX_SLOTS = POLY_MODULUS_DEGREE // 2
MAX_CONTEXT_BYTES = 16 * 1024 * 1024
DEPTH = 3  # Gemm, square, Gemm


class CkksError(InputError):
    """Bad CKKS input; ``code`` is a veilnet wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MlpWeights:
    """logits = (x W1 + b1)^2 W2 + b2, the node shard of a square-activation MLP."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


def new_context() -> ts.Context:
    """A fresh CKKS context with its secret key (the client's)."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE,
                     coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
    ctx.global_scale = 2 ** SCALE_BITS
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The context a node may receive: no secret key (and no Galois or relin-free surprises)."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                         save_relin_keys=True)


def encrypt_columns(ctx: ts.Context, x: np.ndarray) -> list[bytes]:
    """One ciphertext per feature, the batch in the slots: x [N, F] -> F ciphertexts."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_SLOTS:
        raise CkksError("bad_inputs", f"expected [N, features] with 1 <= N <= {MAX_SLOTS}, "
                                      f"got shape {list(x.shape)}")
    return [ts.ckks_vector(ctx, x[:, i].tolist()).serialize() for i in range(x.shape[1])]


def decrypt_columns(ctx: ts.Context, ciphertexts: Sequence[bytes], n: int) -> np.ndarray:
    """The inverse of ``encrypt_columns`` for the node's outputs: [n, len(ciphertexts)]."""
    try:
        cols = [ts.ckks_vector_from(ctx, c).decrypt() for c in ciphertexts]
    except Exception as exc:  # TenSEAL raises several types for bad bytes
        raise CkksError("bad_response", f"an output ciphertext does not decrypt: {exc}") from None
    return np.array([c[:n] for c in cols], dtype=np.float64).T


def load_public_context(data: bytes) -> ts.Context:
    """A context received from a client: parsed, public only, with usable parameters."""
    if not isinstance(data, bytes) or not data:
        raise CkksError("bad_context", "'context' must be the serialized TenSEAL context")
    if len(data) > MAX_CONTEXT_BYTES:
        raise CkksError("bad_context", f"the context has {len(data)} bytes, limit "
                                       f"{MAX_CONTEXT_BYTES}")
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises several types for bytes that do not parse
        raise CkksError("bad_context", f"not a TenSEAL context: {exc}") from None
    if ctx.is_private():
        raise CkksError("bad_context", "the context contains a secret key: a client must "
                                       "never send it (use make_context_public)")
    if not ctx.has_public_key() or not ctx.has_relin_keys():
        raise CkksError("bad_context", "the context lacks the public or relinearization keys")
    degree = ctx.data.seal_context().first_context_data().parms().poly_modulus_degree()
    if degree != POLY_MODULUS_DEGREE:
        raise CkksError("bad_parameters", f"polynomial modulus degree {degree}; this shard "
                                          f"needs {POLY_MODULUS_DEGREE}")
    try:  # the depth the shard needs, tried on a probe encrypted with the public key
        probe = ts.ckks_vector(ctx, [1.0])
        ((probe * 1.0).square() * 1.0).serialize()
    except ValueError as exc:
        raise CkksError("bad_parameters", f"the context cannot evaluate multiplicative depth "
                                          f"{DEPTH} ({exc})") from None
    return ctx


def evaluate_mlp(ctx: ts.Context, ciphertexts: Sequence[bytes],
                 weights: MlpWeights) -> list[bytes]:
    """The node side: ``(x W1 + b1)^2 W2 + b2`` on feature-major ciphertexts."""
    features = weights.w1.shape[0]
    if not isinstance(ciphertexts, list | tuple) or len(ciphertexts) != features:
        raise CkksError("bad_inputs", f"expected {features} ciphertexts (one per feature), got "
                                      f"{len(ciphertexts) if isinstance(ciphertexts, list) else 0}")
    try:
        xs = [ts.ckks_vector_from(ctx, c) for c in ciphertexts]
    except Exception as exc:  # TenSEAL raises several types for bytes that do not parse
        raise CkksError("bad_ciphertext", f"a ciphertext does not match the context: {exc}") \
            from None
    sizes = {x.size() for x in xs}
    if len(sizes) != 1 or not 1 <= min(sizes) <= MAX_SLOTS:
        raise CkksError("bad_ciphertext", f"the ciphertexts must hold the same number of samples "
                                          f"(1 to {MAX_SLOTS}); they hold {sorted(sizes)}")
    w1, b1 = weights.w1.astype(np.float64), weights.b1.astype(np.float64)
    w2, b2 = weights.w2.astype(np.float64), weights.b2.astype(np.float64)
    try:
        hidden = []
        for j in range(w1.shape[1]):
            acc = xs[0] * float(w1[0, j])
            for i in range(1, features):
                acc += xs[i] * float(w1[i, j])
            acc += float(b1[j])
            hidden.append(acc.square())
        outputs = []
        for k in range(w2.shape[1]):
            acc = hidden[0] * float(w2[0, k])
            for j in range(1, len(hidden)):
                acc += hidden[j] * float(w2[j, k])
            acc += float(b2[k])
            outputs.append(acc.serialize())
    except ValueError as exc:  # e.g. "scale out of bounds": parameters too small for the depth
        raise CkksError("bad_parameters", f"the ciphertexts cannot carry this shard: {exc}") \
            from None
    return outputs


def mlp_weights_from_onnx(model: object) -> MlpWeights:
    """W1, b1, W2, b2 of a node shard Gemm -> Mul(x, x) -> Gemm; CkksError otherwise."""
    from onnx import numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    ops = [n.op_type for n in graph.node]
    if ops != ["Gemm", "Mul", "Gemm"] or graph.node[1].input[0] != graph.node[1].input[1]:
        raise CkksError("unsupported", f"CKKS runs Gemm -> square -> Gemm shards; this shard "
                                       f"is {ops}")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    try:
        g1, g2 = graph.node[0], graph.node[2]
        if any(a.name in ("transA", "transB") and a.i for n in (g1, g2) for a in n.attribute):
            raise KeyError("transposed Gemm")
        return MlpWeights(inits[g1.input[1]], inits[g1.input[2]], inits[g2.input[1]],
                          inits[g2.input[2]])
    except (KeyError, IndexError) as exc:
        raise CkksError("unsupported", f"the shard's Gemm weights are not initializers: {exc}") \
            from None
