"""CKKS mode: the digits MLP, TenSEAL evaluation against the plaintext model, rejected inputs
(the node and testnet tests are in tests/network/test_ckks_network.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tenseal as ts

from crypto.ckks import (
    CkksError,
    MlpWeights,
    decrypt_columns,
    encrypt_columns,
    evaluate_mlp,
    load_public_context,
    mlp_weights_from_onnx,
    new_context,
    public_context_bytes,
)
from models import Manifest
from models.digits import accuracy, forward, load_digits_split, train

LOGIT_TOLERANCE = 0.25  # |CKKS - plaintext| on logits up to ~80 (docs/threat-model.md)


@pytest.fixture(scope="module")
def weights(digits_dir: Path) -> MlpWeights:
    import onnx

    node = Manifest.load(digits_dir).node_shards[0]
    return mlp_weights_from_onnx(onnx.load(str(digits_dir / node.path)))


def test_training_is_deterministic_and_accurate(digits_dir: Path) -> None:
    data = load_digits_split()
    a, b = train(data, epochs=50), train(data, epochs=50)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    manifest = Manifest.load(digits_dir)
    reported = manifest.extra["source"]["test_accuracy"]
    assert reported >= 0.95
    # the ONNX pipeline (head, node, tail) gives the accuracy the manifest reports
    x = (data.x_test * 16).astype(np.float32)
    env: dict[str, np.ndarray] = {"pixels": x}
    for shard in manifest.shards:
        sess = ort.InferenceSession(str(digits_dir / shard.path),
                                    providers=["CPUExecutionProvider"])
        env.update(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {t.name: env[t.name] for t in shard.inputs}),
                       strict=True))
    assert float((env["probabilities"].argmax(1) == data.y_test).mean()) == \
        pytest.approx(reported, abs=1e-4)


def test_ckks_equals_plaintext_on_the_whole_test_split(weights: MlpWeights) -> None:
    data = load_digits_split()
    params = {"W1": weights.w1, "b1": weights.b1, "W2": weights.w2, "b2": weights.b2}
    ctx = new_context()
    node_ctx = load_public_context(public_context_bytes(ctx))  # what a node gets
    out = evaluate_mlp(node_ctx, encrypt_columns(ctx, data.x_test), weights)
    logits = decrypt_columns(ctx, out, len(data.x_test))
    reference = forward(params, data.x_test.astype(np.float64))  # numpy, float64
    assert logits.shape == reference.shape == (len(data.x_test), 10)
    assert np.abs(logits - reference).max() <= LOGIT_TOLERANCE
    assert np.array_equal(logits.argmax(1), reference.argmax(1))  # every test digit
    assert float((logits.argmax(1) == data.y_test).mean()) == \
        pytest.approx(accuracy(params, data.x_test, data.y_test))


def test_bad_contexts_and_ciphertexts_are_rejected(weights: MlpWeights) -> None:
    ctx = new_context()
    x = load_digits_split().x_test[:3]
    cases: list[tuple[Any, str]] = []
    with pytest.raises(CkksError) as info:  # the secret key must never reach a node
        load_public_context(ctx.serialize(save_secret_key=True))
    cases.append((info.value, "secret key"))
    with pytest.raises(CkksError) as info:
        load_public_context(b"\x00not a context")
    cases.append((info.value, "not a TenSEAL context"))
    shallow = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                         coeff_mod_bit_sizes=[60, 40, 60])
    shallow.global_scale = 2 ** 40
    with pytest.raises(CkksError) as info:  # too few primes for depth 3
        load_public_context(public_context_bytes(shallow))
    cases.append((info.value, "depth 3"))
    small = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096,
                       coeff_mod_bit_sizes=[40, 20, 40])
    small.global_scale = 2 ** 20
    with pytest.raises(CkksError) as info:
        load_public_context(public_context_bytes(small))
    cases.append((info.value, "degree 4096"))
    node_ctx = load_public_context(public_context_bytes(ctx))
    big = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=16384,
                     coeff_mod_bit_sizes=[60, 40, 40, 40, 60])
    big.global_scale = 2 ** 40
    with pytest.raises(CkksError) as info:  # ciphertexts of other parameters
        evaluate_mlp(node_ctx, encrypt_columns(big, x), weights)
    cases.append((info.value, "does not match the context"))
    with pytest.raises(CkksError) as info:
        evaluate_mlp(node_ctx, encrypt_columns(ctx, x)[:10], weights)
    cases.append((info.value, "expected 64 ciphertexts"))
    with pytest.raises(CkksError) as info:
        evaluate_mlp(node_ctx, [b"xx"] * 64, weights)
    cases.append((info.value, "same number of samples"))
    for exc, words in cases:
        assert words in str(exc), (exc.code, str(exc))
