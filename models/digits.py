"""A small MLP for scikit-learn's 8x8 digits, built for homomorphic evaluation (CKKS).

``veilnet model import digits --out DIR`` trains it here, deterministically (numpy, fixed seed,
full-batch Adam), on the digits data set that scikit-learn ships (no download), and writes it as
ONNX shards with a manifest like every other model:

    client-head   x = pixels / 16                       [N, 64]
    node          logits = (x W1 + b1)^2 W2 + b2        [N, 10]   (square activation)
    client-tail   probabilities = softmax(logits)        [N, 10]

The square is the activation because CKKS evaluates polynomials only: the node shard has
multiplicative depth 3 (x·W1, the square, ·W2), which fixes the CKKS parameters
(crypto/ckks.py). Training and test split are fixed (75/25, stratified, seed 0), so the test
accuracy is reproducible; it goes into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.importer import Progress, check_output_dir, no_progress, write_sharded
from models.manifest import Manifest

MODEL_NAME = "digits-mlp"
HIDDEN = 32
SEED = 0
EPOCHS = 400
LEARNING_RATE = 0.01


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray  # float32, scaled to [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> DigitsData:
    """scikit-learn's digits (bundled with the package), split 75/25, stratified, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED,
                                                        stratify=y)
    return DigitsData(x_train, y_train, x_test, y_test)


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of the MLP (float64 reference)."""
    h = x @ params["W1"] + params["b1"]
    return (h * h) @ params["W2"] + params["b2"]


def train(data: DigitsData, epochs: int = EPOCHS, seed: int = SEED) -> dict[str, np.ndarray]:
    """Full-batch Adam on softmax cross-entropy; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    params = {"W1": rng.normal(0, 0.15, (64, HIDDEN)), "b1": np.zeros(HIDDEN),
              "W2": rng.normal(0, 0.15, (HIDDEN, 10)), "b2": np.zeros(10)}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    x, y = data.x_train.astype(np.float64), data.y_train
    onehot = np.eye(10)[y]
    for step in range(1, epochs + 1):
        pre = x @ params["W1"] + params["b1"]
        h = pre * pre
        logits = h @ params["W2"] + params["b2"]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        d_logits = (p - onehot) / len(x)
        grads = {"W2": h.T @ d_logits, "b2": d_logits.sum(axis=0)}
        d_pre = (d_logits @ params["W2"].T) * 2 * pre
        grads["W1"] = x.T @ d_pre
        grads["b1"] = d_pre.sum(axis=0)
        for k in params:  # Adam
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - 0.9 ** step), v[k] / (1 - 0.999 ** step)
            params[k] -= LEARNING_RATE * m_hat / (np.sqrt(v_hat) + 1e-8)
    return {k: p.astype(np.float32) for k, p in params.items()}


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(params, x.astype(np.float64)).argmax(axis=1) == y).mean())


def build_onnx(params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """pixels [N, 64] (0..16) -> x -> logits -> probabilities, cut points x and logits."""
    inits = [numpy_helper.from_array(params[k], name=k) for k in ("W1", "b1", "W2", "b2")]
    inits.append(numpy_helper.from_array(np.array(1 / 16, np.float32), name="scale"))
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["x"], name="scale_pixels"),
        helper.make_node("Gemm", ["x", "W1", "b1"], ["pre"], name="dense1"),
        helper.make_node("Mul", ["pre", "pre"], ["hidden"], name="square"),
        helper.make_node("Gemm", ["hidden", "W2", "b2"], ["logits"], name="dense2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, MODEL_NAME,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="veilnet")
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def import_digits(out_dir: Path, progress: Progress = no_progress) -> Manifest:
    """Train the digits MLP and write it as a sharded model with a manifest to ``out_dir``."""
    check_output_dir(out_dir)
    data = load_digits_split()
    progress(f"training a 64-{HIDDEN}-10 MLP (square activation) on {len(data.x_train)} digits "
             f"({EPOCHS} full-batch Adam steps, seed {SEED})")
    params = train(data)
    acc = accuracy(params, data.x_test, data.y_test)
    progress(f"test accuracy {acc:.4f} on {len(data.x_test)} held-out digits")
    extra = {
        "config": {"family": "mlp-square", "inputs": 64, "hidden": HIDDEN, "classes": 10,
                   "multiplicative_depth": 3},
        "source": {"dataset": "sklearn.datasets.load_digits", "split": "75/25 stratified, "
                   f"seed {SEED}", "test_accuracy": round(acc, 4),
                   "test_samples": len(data.x_test)},
    }
    return write_sharded(build_onnx(params), ["x", "logits"], Path(out_dir), MODEL_NAME, extra,
                         progress)
