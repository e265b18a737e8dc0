"""Build an ONNX graph for a post-LayerNorm BERT encoder (sentence-transformers style) from numpy
weights in Hugging Face naming.

The graph reproduces ``BertModel`` followed by mean pooling and L2 normalisation. Tensor names at
the boundaries that splitting uses are stable: ``hidden_0`` (embeddings), ``attention_bias``,
``hidden_{i}`` (output of layer i-1), ``sentence_embedding``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20  # Gelu is an ONNX op from opset 20
IR_VERSION = 9
MASK_VALUE = -10000.0  # added to attention scores of padding positions, as in BERT


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    vocab_size: int
    max_position: int
    type_vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, object]) -> BertConfig:
        return cls(
            hidden_size=int(cfg["hidden_size"]),  # type: ignore[arg-type]
            num_layers=int(cfg["num_hidden_layers"]),  # type: ignore[arg-type]
            num_heads=int(cfg["num_attention_heads"]),  # type: ignore[arg-type]
            intermediate_size=int(cfg["intermediate_size"]),  # type: ignore[arg-type]
            layer_norm_eps=float(cfg["layer_norm_eps"]),  # type: ignore[arg-type]
            vocab_size=int(cfg["vocab_size"]),  # type: ignore[arg-type]
            max_position=int(cfg["max_position_embeddings"]),  # type: ignore[arg-type]
            type_vocab_size=int(cfg["type_vocab_size"]),  # type: ignore[arg-type]
        )


class GraphBuilder:
    """Nodes and initializers of a graph being built (models/masked_graph.py extends it)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


# Initializer names of the embeddings (as the graphs name them) and their Hugging Face names.
EMBEDDINGS = {"embeddings.word": "embeddings.word_embeddings.weight",
              "embeddings.position": "embeddings.position_embeddings.weight",
              "embeddings.token_type": "embeddings.token_type_embeddings.weight",
              "embeddings.ln.weight": "embeddings.LayerNorm.weight",
              "embeddings.ln.bias": "embeddings.LayerNorm.bias"}


def embeddings(b: GraphBuilder, w: Mapping[str, np.ndarray], ids: str, types: str,
               eps: float) -> str:
    """``hidden_0``: LayerNorm(word + position + token type) from ``w`` (``EMBEDDINGS`` keys)."""
    word = b.op("Gather", [b.const("embeddings.word", w["embeddings.word"]), ids], "emb/word",
                axis=0)
    seq_len = b.op("Shape", [ids], "emb/seq_len", start=1, end=2)
    pos_table = b.const("embeddings.position", w["embeddings.position"])
    pos = b.op(
        "Slice", [pos_table, b.const("emb/zero", np.array([0], np.int64)), seq_len,
                  b.const("emb/axis0", np.array([0], np.int64))], "emb/position",
    )
    ttype = b.op("Gather", [b.const("embeddings.token_type", w["embeddings.token_type"]),
                            types], "emb/token_type", axis=0)
    summed = b.op("Add", [b.op("Add", [word, pos], "emb/word_pos"), ttype], "emb/sum")
    return b.op(
        "LayerNormalization",
        [summed, b.const("embeddings.ln.weight", w["embeddings.ln.weight"]),
         b.const("embeddings.ln.bias", w["embeddings.ln.bias"])],
        "hidden_0", axis=-1, epsilon=eps,
    )


def attention_bias(b: GraphBuilder, mask: str) -> tuple[str, str]:
    """(the mask as float32, ``attention_bias``: 0 where attended, MASK_VALUE at padding)."""
    mask_f = b.op("Cast", [mask], "mask/float", to=TensorProto.FLOAT)
    inverted = b.op("Sub", [b.const("mask/one", np.array(1.0, np.float32)), mask_f], "mask/inv")
    scaled = b.op("Mul", [inverted, b.const("mask/value", np.array(MASK_VALUE, np.float32))],
                  "mask/scaled")
    bias = b.op("Unsqueeze", [scaled, b.const("mask/axes", np.array([1, 2], np.int64))],
                "attention_bias")
    return mask_f, bias


def scaled_attention(b: GraphBuilder, p: str, q: str, k: str, v: str, bias: str,
                     head_dim: int) -> str:
    """softmax(q k / sqrt(d) + bias) v for q, v [B, h, T, d] and k [B, h, d, T], returned as
    [B, T, h, d]."""
    scores = b.op("MatMul", [q, k], f"{p}/attention/scores")
    scale = b.const(f"{p}/attention/scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    scores = b.op("Mul", [scores, scale], f"{p}/attention/scaled")
    scores = b.op("Add", [scores, bias], f"{p}/attention/masked")
    probs = b.op("Softmax", [scores], f"{p}/attention/probs", axis=-1)
    ctx = b.op("MatMul", [probs, v], f"{p}/attention/context")
    return b.op("Transpose", [ctx], f"{p}/attention/context_t", perm=[0, 2, 1, 3])


def mean_pool_normalize(b: GraphBuilder, hidden: str, mask_f: str) -> str:
    """``sentence_embedding``: the mean of ``hidden`` over attended positions, L2-normalised."""
    mask3 = b.op("Unsqueeze", [mask_f, b.const("pool/axes", np.array([2], np.int64))],
                 "pool/mask")
    masked = b.op("Mul", [hidden, mask3], "pool/masked")
    axis1 = b.const("pool/axis1", np.array([1], np.int64))
    total = b.op("ReduceSum", [masked, axis1], "pool/sum", keepdims=0)
    count = b.op("ReduceSum", [mask3, axis1], "pool/count", keepdims=0)
    count = b.op("Max", [count, b.const("pool/min_count", np.array(1e-9, np.float32))],
                 "pool/count_clamped")
    mean = b.op("Div", [total, count], "pool/mean")
    axis_last = b.const("pool/axis_last", np.array([-1], np.int64))
    norm = b.op("ReduceL2", [mean, axis_last], "pool/norm", keepdims=1)
    norm = b.op("Max", [norm, b.const("pool/min_norm", np.array(1e-12, np.float32))],
                "pool/norm_clamped")
    return b.op("Div", [mean, norm], "sentence_embedding")


def build_bert_sentence_encoder(
    cfg: BertConfig, weights: Mapping[str, np.ndarray], name: str
) -> onnx.ModelProto:
    """The whole model: embeddings, encoder layers, mean pooling, L2 normalisation."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    b = GraphBuilder()
    w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if k != "position_ids"}

    def get(key: str) -> np.ndarray:
        if key not in w:
            raise KeyError(f"weights have no tensor {key!r}")
        return w[key]

    # --- embeddings and the attention bias (client head) ---
    hidden = embeddings(b, {name: get(hf) for name, hf in EMBEDDINGS.items()}, "input_ids",
                        "token_type_ids", cfg.layer_norm_eps)
    mask_f, bias = attention_bias(b, "attention_mask")

    for layer in range(cfg.num_layers):
        hidden = _encoder_layer(b, cfg, w, layer, hidden, bias)

    # --- mean pooling and L2 normalisation (client tail) ---
    mean_pool_normalize(b, hidden, mask_f)

    graph = helper.make_graph(
        b.nodes,
        name,
        inputs=[
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        outputs=[helper.make_tensor_value_info(
            "sentence_embedding", TensorProto.FLOAT, ["batch", cfg.hidden_size])],
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="veilnet"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _encoder_layer(
    b: GraphBuilder, cfg: BertConfig, w: Mapping[str, np.ndarray], layer: int, x: str, bias: str
) -> str:
    src = f"encoder.layer.{layer}"
    p = f"layer.{layer}"
    heads, dh, hid = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    split_shape = b.const(f"{p}/split_shape", np.array([0, 0, heads, dh], np.int64))
    merge_shape = b.const(f"{p}/merge_shape", np.array([0, 0, hid], np.int64))

    def linear(inp: str, hf: str, out: str) -> str:
        # HF Linear stores [out, in]; the graph computes inp @ W^T + b
        weight = b.const(f"{p}.{out}.weight", w[f"{src}.{hf}.weight"].T)
        mm = b.op("MatMul", [inp, weight], f"{p}/{out}/matmul")
        return b.op("Add", [mm, b.const(f"{p}.{out}.bias", w[f"{src}.{hf}.bias"])], f"{p}/{out}")

    def heads_of(name: str, hf: str, perm: list[int]) -> str:
        flat = linear(x, hf, name)
        split = b.op("Reshape", [flat, split_shape], f"{p}/{name}/split")
        return b.op("Transpose", [split], f"{p}/{name}/heads", perm=perm)

    q = heads_of("query", "attention.self.query", [0, 2, 1, 3])  # [B, h, T, d]
    k = heads_of("key", "attention.self.key", [0, 2, 3, 1])  # [B, h, d, T]
    v = heads_of("value", "attention.self.value", [0, 2, 1, 3])  # [B, h, T, d]
    ctx = scaled_attention(b, p, q, k, v, bias, dh)
    ctx = b.op("Reshape", [ctx, merge_shape], f"{p}/attention/context_merged")
    attn = linear(ctx, "attention.output.dense", "attention_out")
    res1 = b.op("Add", [attn, x], f"{p}/attention/residual")
    h1 = b.op(
        "LayerNormalization",
        [res1, b.const(f"{p}.attention_ln.weight", w[f"{src}.attention.output.LayerNorm.weight"]),
         b.const(f"{p}.attention_ln.bias", w[f"{src}.attention.output.LayerNorm.bias"])],
        f"{p}/attention/ln", axis=-1, epsilon=cfg.layer_norm_eps,
    )
    ffn = linear(h1, "intermediate.dense", "ffn_in")
    ffn = b.op("Gelu", [ffn], f"{p}/ffn/gelu")
    ffn = linear(ffn, "output.dense", "ffn_out")
    res2 = b.op("Add", [ffn, h1], f"{p}/ffn/residual")
    return b.op(
        "LayerNormalization",
        [res2, b.const(f"{p}.ffn_ln.weight", w[f"{src}.output.LayerNorm.weight"]),
         b.const(f"{p}.ffn_ln.bias", w[f"{src}.output.LayerNorm.bias"])],
        f"hidden_{layer + 1}", axis=-1, epsilon=cfg.layer_norm_eps,
    )
