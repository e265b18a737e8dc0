"""The ONNX graphs of a ``masked/1`` deployment of a BERT encoder (models/masked.py).

A node shard is one bias-free float64 ``MatMul`` on rows ``[rows, d_in]`` (``rows`` = batch *
seq). Everything else runs on the client, in float32 exactly as models/bert_graph.py computes it:
the client head (embeddings, the attention bias), after each node shard a ``client`` shard (the
bias, attention or GELU, residuals and LayerNorms) and the client tail (mean pooling, L2
normalisation). A client shard ends by flattening what the next node shard needs to
``[rows, d]`` float64; the client masks those rows before they leave it.

Tensor names: ``masked/{l}/{kind}/in`` and ``masked/{l}/{kind}/out`` for kind ``qkv``, ``o``,
``up``, ``down`` of layer ``l``; ``masked/{l}/h1`` (the stream after the attention LayerNorm);
``hidden_{l}``, ``attention_bias`` and ``sentence_embedding`` as in models/bert_graph.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from models.bert_graph import (
    EMBEDDINGS,
    IR_VERSION,
    OPSET,
    GraphBuilder,
    attention_bias,
    embeddings,
    mean_pool_normalize,
    scaled_attention,
)

KINDS = ("qkv", "o", "up", "down")  # the node shards of one layer, in order
ROWS, BATCH, SEQ = "rows", "batch", "seq"
F32, F64, I64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

Weights = Mapping[str, np.ndarray]  # plaintext initializers by their models/bert_graph.py name


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    intermediate: int
    layers: int
    eps: float  # LayerNormalization epsilon

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def width(self, kind: str) -> tuple[int, int]:
        """(input, output) width of a node shard of this kind."""
        h, i = self.hidden, self.intermediate
        return {"qkv": (h, 3 * h), "o": (h, h), "up": (h, i), "down": (i, h)}[kind]


def node_in(layer: int, kind: str) -> str:
    return f"masked/{layer}/{kind}/in"


def node_out(layer: int, kind: str) -> str:
    return f"masked/{layer}/{kind}/out"


def h1(layer: int) -> str:
    return f"masked/{layer}/h1"


class _Graph(GraphBuilder):
    """Nodes, initializers and typed inputs/outputs of one shard."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def input(self, name: str, dtype: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, dtype: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))

    def rows(self, x: str, width: int, out: str) -> str:
        """``x`` [batch, seq, width] float32 -> ``out`` [rows, width] float64."""
        flat = self.op("Reshape", [x, self.const(f"{out}/shape", np.array([-1, width],
                                                                         np.int64))],
                       f"{out}/flat")
        return self.op("Cast", [flat], out, to=F64)

    def finish(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="veilnet")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _f32(w: Weights, name: str) -> np.ndarray:
    return np.asarray(w[name], np.float32)


def _stream(dims: Dims) -> list[int | str]:
    return [BATCH, SEQ, dims.hidden]


def head(dims: Dims, w: Weights) -> onnx.ModelProto:
    """Embeddings + LayerNorm (``hidden_0``), ``attention_bias``, and ``masked/0/qkv/in``."""
    g = _Graph()
    ids, mask, types = (g.input(n, I64, [BATCH, SEQ]) for n in MODEL_INPUTS)
    hidden = embeddings(g, {name: _f32(w, name) for name in EMBEDDINGS}, ids, types, dims.eps)
    attention_bias(g, mask)
    g.rows(hidden, dims.hidden, node_in(0, "qkv"))
    g.output(hidden, F32, _stream(dims))
    g.output("attention_bias", F32, [BATCH, 1, 1, SEQ])
    g.output(node_in(0, "qkv"), F64, [ROWS, dims.hidden])
    return g.finish("masked_head")


def node(dims: Dims, layer: int, kind: str, weight: np.ndarray) -> onnx.ModelProto:
    """``masked/{l}/{kind}/out = masked/{l}/{kind}/in @ weight``, float64, nothing else."""
    d_in, d_out = dims.width(kind)
    if weight.shape != (d_in, d_out):
        raise ValueError(f"{kind} weight of layer {layer} is {weight.shape}, not "
                         f"{(d_in, d_out)}")
    g = _Graph()
    x = g.input(node_in(layer, kind), F64, [ROWS, d_in])
    weight_name = g.const(f"masked/{layer}/{kind}/weight", np.asarray(weight, np.float64))
    g.op("MatMul", [x, weight_name], node_out(layer, kind))
    g.output(node_out(layer, kind), F64, [ROWS, d_out])
    return g.finish(f"masked_{layer}_{kind}")


def after_qkv(dims: Dims, w: Weights, layer: int) -> onnx.ModelProto:
    """Biases, attention (as models/bert_graph.py), merged heads -> ``masked/{l}/o/in``."""
    p, hid, heads, dh = f"layer.{layer}", dims.hidden, dims.heads, dims.head_dim
    g = _Graph()
    qkv = g.input(node_out(layer, "qkv"), F64, [ROWS, 3 * hid])
    bias = g.input("attention_bias", F32, [BATCH, 1, 1, SEQ])
    hidden = g.input(f"hidden_{layer}", F32, _stream(dims))
    b_qkv = np.concatenate([_f32(w, f"{p}.{n}.bias") for n in ("query", "key", "value")])
    flat = g.op("Add", [g.op("Cast", [qkv], f"{p}/qkv/float", to=F32),
                        g.const(f"{p}.qkv.bias", b_qkv)], f"{p}/qkv")
    shape = g.op("Concat", [g.op("Shape", [hidden], f"{p}/batch_seq", start=0, end=2),
                            g.const(f"{p}/qkv_width", np.array([3 * hid], np.int64))],
                 f"{p}/qkv_shape", axis=0)
    stream = g.op("Reshape", [flat, shape], f"{p}/qkv/stream")
    parts = [f"{p}/{n}" for n in ("query", "key", "value")]
    g.nodes.append(helper.make_node(
        "Split", [stream, g.const(f"{p}/split_sizes", np.array([hid] * 3, np.int64))], parts,
        name=f"{p}/qkv/split", axis=2))
    split_shape = g.const(f"{p}/split_shape", np.array([0, 0, heads, dh], np.int64))

    def heads_of(part: str, perm: list[int]) -> str:
        split = g.op("Reshape", [part, split_shape], f"{part}/split")
        return g.op("Transpose", [split], f"{part}/heads", perm=perm)

    q = heads_of(parts[0], [0, 2, 1, 3])  # [B, h, T, d]
    k = heads_of(parts[1], [0, 2, 3, 1])  # [B, h, d, T]
    v = heads_of(parts[2], [0, 2, 1, 3])  # [B, h, T, d]
    ctx = scaled_attention(g, p, q, k, v, bias, dh)
    g.rows(ctx, hid, node_in(layer, "o"))  # [B, T, h, d] -> [rows, h*d]
    g.output(node_in(layer, "o"), F64, [ROWS, hid])
    return g.finish(f"masked_{layer}_attention")


def _residual_ln(g: _Graph, dims: Dims, w: Weights, layer: int, kind: str, bias: str,
                 residual: str, ln: str, out: str) -> str:
    """LayerNorm(reshape(float32(kind/out) + bias) + residual) -> ``out`` [B, S, H]."""
    p = f"layer.{layer}"
    x = g.input(node_out(layer, kind), F64, [ROWS, dims.hidden])
    flat = g.op("Add", [g.op("Cast", [x], f"{p}/{kind}/float", to=F32),
                        g.const(f"{p}.{bias}.bias", _f32(w, f"{p}.{bias}.bias"))],
                f"{p}/{bias}")
    stream = g.op("Reshape", [flat, g.op("Shape", [residual], f"{p}/{kind}/shape")],
                  f"{p}/{bias}/stream")
    summed = g.op("Add", [stream, residual], f"{p}/{kind}/residual")
    return g.op("LayerNormalization",
                [summed, g.const(f"{p}.{ln}.weight", _f32(w, f"{p}.{ln}.weight")),
                 g.const(f"{p}.{ln}.bias", _f32(w, f"{p}.{ln}.bias"))],
                out, axis=-1, epsilon=dims.eps)


def after_o(dims: Dims, w: Weights, layer: int) -> onnx.ModelProto:
    """Output bias, residual, attention LayerNorm -> ``masked/{l}/h1`` and ``masked/{l}/up/in``."""
    g = _Graph()
    residual = f"hidden_{layer}"
    out = _residual_ln(g, dims, w, layer, "o", "attention_out",
                       g.input(residual, F32, _stream(dims)), "attention_ln", h1(layer))
    g.rows(out, dims.hidden, node_in(layer, "up"))
    g.output(out, F32, _stream(dims))
    g.output(node_in(layer, "up"), F64, [ROWS, dims.hidden])
    return g.finish(f"masked_{layer}_attention_out")


def after_up(dims: Dims, w: Weights, layer: int) -> onnx.ModelProto:
    """FFN bias and GELU -> ``masked/{l}/down/in``."""
    p, inter = f"layer.{layer}", dims.intermediate
    g = _Graph()
    x = g.input(node_out(layer, "up"), F64, [ROWS, inter])
    up = g.op("Add", [g.op("Cast", [x], f"{p}/up/float", to=F32),
                      g.const(f"{p}.ffn_in.bias", _f32(w, f"{p}.ffn_in.bias"))], f"{p}/ffn_in")
    gelu = g.op("Gelu", [up], f"{p}/ffn/gelu")
    g.op("Cast", [gelu], node_in(layer, "down"), to=F64)
    g.output(node_in(layer, "down"), F64, [ROWS, inter])
    return g.finish(f"masked_{layer}_gelu")


def after_down(dims: Dims, w: Weights, layer: int) -> onnx.ModelProto:
    """FFN output bias, residual, FFN LayerNorm -> ``hidden_{l+1}`` (and, but after the last
    layer, ``masked/{l+1}/qkv/in``)."""
    g = _Graph()
    residual = g.input(h1(layer), F32, _stream(dims))
    out = _residual_ln(g, dims, w, layer, "down", "ffn_out", residual, "ffn_ln",
                       f"hidden_{layer + 1}")
    g.output(out, F32, _stream(dims))
    if layer + 1 < dims.layers:
        g.rows(out, dims.hidden, node_in(layer + 1, "qkv"))
        g.output(node_in(layer + 1, "qkv"), F64, [ROWS, dims.hidden])
    return g.finish(f"masked_{layer}_ffn_out")


def tail(dims: Dims) -> onnx.ModelProto:
    """Mean pooling over the attended positions and L2 normalisation, as models/bert_graph.py."""
    g = _Graph()
    hidden = g.input(f"hidden_{dims.layers}", F32, _stream(dims))
    mask = g.input("attention_mask", I64, [BATCH, SEQ])
    mean_pool_normalize(g, hidden, g.op("Cast", [mask], "mask/float", to=F32))
    g.output("sentence_embedding", F32, [BATCH, dims.hidden])
    return g.finish("masked_tail")
