"""Build an ONNX graph for a Llama-style decoder (Hugging Face ``LlamaForCausalLM``) with a
key/value cache, from numpy weights in GGUF tensor naming.

Weights use GGUF names with torch orientation (``nn.Linear`` weight = ``[out, in]``) and the q/k
rows already in Hugging Face's layout, so the rotate_half form of RoPE applies. One call of the
graph runs ``seq`` new tokens after ``past_seq`` cached ones:

- inputs: ``input_ids`` int64 ``[batch, seq]``; per layer i ``past_key_{i}``, ``past_value_{i}``
  float32 ``[batch, n_kv_heads, past_seq, head_dim]`` (``past_seq`` may be 0);
- outputs: ``logits`` float32 ``[batch, seq, vocab]``; per layer i ``present_key_{i}``,
  ``present_value_{i}`` ``[batch, n_kv_heads, past_seq + seq, head_dim]`` (keys after RoPE).

Positions are ``past_seq + arange(seq)``; attention is causal, without a padding mask; batch rows
are independent and all the same length. Tensor names at the boundaries that splitting uses are
stable: ``hidden_embed`` (token embeddings) and ``hidden_{i}`` (the residual stream after layer
i). Layer i's nodes are named ``l{i}/...`` and read only ``hidden_{i-1}`` (``hidden_embed`` for
layer 0), ``past_key_{i}``, ``past_value_{i}`` and initializers: each layer derives its own
positions and causal mask (from the lengths of ``present_value_{i}`` and its input, so every node
of the layer depends on its input and a shard cut there needs nothing else).

Initializers keep the GGUF names; projection matrices are stored transposed for MatMul as
``blk.{i}.<name>.weight.T`` (``[in, out]``). The LM head is a Gemm with ``transB`` on the
``[vocab, d]`` table, so a tied model stores ``token_embd.weight`` once. ``context_length`` is
informational: the graph does not limit the sequence length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from errors import InputError

OPSET = 20
IR_VERSION = 9
MASK_VALUE = -1e30  # added to the attention scores of future positions

_Getter = Callable[[str, tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int  # intermediate size
    vocab: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool = True
    context_length: int = 8192


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.nbytes = 0  # of the initializers

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.nbytes += value.nbytes
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


def _check_config(cfg: LlamaConfig) -> None:
    sizes = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn,
             cfg.vocab)
    if min(sizes) < 1:
        raise InputError(f"Llama config sizes must be positive: {cfg}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise InputError(
            f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.n_kv_heads})")
    if cfg.head_dim % 2:
        raise InputError(f"head_dim ({cfg.head_dim}) must be even for RoPE")


def _weights_getter(weights: Mapping[str, np.ndarray]) -> _Getter:
    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in weights:
            raise InputError(f"weights have no tensor {name!r}")
        value = np.asarray(weights[name])
        if value.shape != shape:
            raise InputError(
                f"tensor {name!r} has shape {list(value.shape)}, expected {list(shape)}")
        return value.astype(np.float32, copy=False)

    return get


def build_llama_decoder(config: LlamaConfig, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The whole decoder: embedding gather, ``n_layers`` decoder layers, final RMSNorm, LM head."""
    cfg = config
    _check_config(cfg)
    get = _weights_getter(weights)
    d = cfg.d_model
    b = _Builder()

    # Check every tensor before building anything, so a bad file fails fast and by name.
    embed = get("token_embd.weight", (cfg.vocab, d))
    head = embed if cfg.tied_embeddings else get("output.weight", (cfg.vocab, d))
    for i in range(cfg.n_layers):
        _layer_weights(cfg, get, i)
    get("output_norm.weight", (d,))

    embed_name = b.const("token_embd.weight", embed)
    hidden = b.op("Gather", [embed_name, "input_ids"], "hidden_embed", axis=0)
    for i in range(cfg.n_layers):
        hidden = _decoder_layer(b, cfg, _layer_weights(cfg, get, i), i, hidden)

    normed = _rms_norm(b, cfg, hidden, b.const("output_norm.weight",
                                               get("output_norm.weight", (d,))), "head")
    # Gemm with transB reads the [vocab, d] table as stored (shared with the embedding when tied)
    head_name = embed_name if cfg.tied_embeddings else b.const("output.weight", head)
    flat = b.op("Reshape", [normed, b.const("head/flat_shape", np.array([-1, d], np.int64))],
                "head/flat")
    flat_logits = b.op("Gemm", [flat, head_name], "head/logits_flat", transB=1)
    out_shape = b.op(
        "Concat", [b.op("Shape", [normed], "head/batch_seq", start=0, end=2),
                   b.const("head/vocab", np.array([cfg.vocab], np.int64))],
        "head/logits_shape", axis=0,
    )
    b.op("Reshape", [flat_logits, out_shape], "logits")

    kv_dims = ["batch", cfg.n_kv_heads, "past_seq", cfg.head_dim]
    present_dims = ["batch", cfg.n_kv_heads, "total_seq", cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "seq", cfg.vocab])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT,
                                                        kv_dims))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}",
                                                         TensorProto.FLOAT, present_dims))
    graph = helper.make_graph(b.nodes, "llama_decoder", inputs=inputs, outputs=outputs,
                              initializer=b.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="veilnet"
    )
    model.ir_version = IR_VERSION
    if b.nbytes < 2**31 - 2**24:  # the checker cannot take a proto past protobuf's 2 GiB
        onnx.checker.check_model(model)
    return model


def _layer_weights(cfg: LlamaConfig, get: _Getter, i: int) -> dict[str, np.ndarray]:
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {
        "attn_norm": (d,), "attn_q": (q_out, d), "attn_k": (kv_out, d), "attn_v": (kv_out, d),
        "attn_output": (d, q_out), "ffn_norm": (d,), "ffn_gate": (f, d), "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    return {key: get(f"blk.{i}.{key}.weight", shape) for key, shape in shapes.items()}


def _rms_norm(b: _Builder, cfg: LlamaConfig, x: str, weight: str, p: str) -> str:
    """x / sqrt(mean(x^2, -1) + eps) * weight, in float32 (the pattern onnxruntime fuses into
    SimplifiedLayerNormalization)."""
    sq = b.op("Pow", [x, b.const(f"{p}/norm/two", np.array(2.0, np.float32))], f"{p}/norm/sq")
    mean = b.op("ReduceMean", [sq, b.const(f"{p}/norm/axes", np.array([-1], np.int64))],
                f"{p}/norm/mean", keepdims=1)
    var = b.op("Add", [mean, b.const(f"{p}/norm/eps", np.array(cfg.rms_eps, np.float32))],
               f"{p}/norm/var_eps")
    rms = b.op("Sqrt", [var], f"{p}/norm/rms")
    return b.op("Mul", [b.op("Div", [x, rms], f"{p}/norm/scaled"), weight], f"{p}/norm/out")


def _decoder_layer(
    b: _Builder, cfg: LlamaConfig, w: Mapping[str, np.ndarray], i: int, x: str
) -> str:
    p = f"l{i}"
    src = f"blk.{i}"
    hd, heads, kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    group = heads // kv
    half = hd // 2

    def const(name: str, value: np.ndarray) -> str:
        return b.const(f"{p}/{name}", value)

    def ints(name: str, *values: int) -> str:
        return const(name, np.array(values, np.int64))

    def linear(inp: str, key: str, out: str) -> str:
        # torch Linear stores [out, in]; the graph computes inp @ W^T with W^T stored
        return b.op("MatMul", [inp, b.const(f"{src}.{key}.weight.T", w[key].T)], f"{p}/{out}")

    # --- attention ---
    normed = _rms_norm(b, cfg, x, b.const(f"{src}.attn_norm.weight", w["attn_norm"]),
                       f"{p}/attn")
    q = b.op("Reshape", [linear(normed, "attn_q", "q/proj"), ints("q/split_shape", 0, 0,
                                                                 heads, hd)], f"{p}/q/split")
    k = b.op("Reshape", [linear(normed, "attn_k", "k/proj"), ints("k/split_shape", 0, 0, kv,
                                                                 hd)], f"{p}/k/split")
    v = b.op("Reshape", [linear(normed, "attn_v", "v/proj"), ints("v/split_shape", 0, 0, kv,
                                                                 hd)], f"{p}/v/split")
    v_new = b.op("Transpose", [v], f"{p}/v/heads", perm=[0, 2, 1, 3])  # [B, kv, T, hd]
    values = b.op("Concat", [f"past_value_{i}", v_new], f"present_value_{i}", axis=2)

    # --- positions past_seq + arange(seq), RoPE tables, causal mask: [seq, total] ---
    # Lengths come from present_value (past_seq + seq) and x (seq), so every node of the layer
    # depends on x: a shard cut at hidden_{i-1} needs nothing else from earlier shards.
    total_len = b.op("Shape", [values], f"{p}/rope/total_len", start=2, end=3)
    seq_len = b.op("Shape", [x], f"{p}/rope/seq_len", start=1, end=2)
    past_len = b.op("Sub", [total_len, seq_len], f"{p}/rope/past_len")
    scalar = ints("rope/scalar_shape")  # shape [] for Range's scalar bounds
    start = b.op("Reshape", [past_len, scalar], f"{p}/rope/start")
    limit = b.op("Reshape", [total_len, scalar], f"{p}/rope/limit")
    one = const("rope/one", np.array(1, np.int64))
    q_pos = b.op("Range", [start, limit, one], f"{p}/rope/q_pos")  # [seq]
    k_pos = b.op("Range", [const("rope/zero", np.array(0, np.int64)), limit, one],
                 f"{p}/rope/k_pos")  # [total]
    pos_col = b.op("Unsqueeze", [q_pos, ints("rope/axis1", 1)], f"{p}/rope/q_pos_col")
    pos_f = b.op("Cast", [pos_col], f"{p}/rope/pos_float", to=TensorProto.FLOAT)  # [seq, 1]
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64)
                                         .astype(np.float32) / hd))
    inv_freq = np.concatenate([inv_freq, inv_freq]).astype(np.float32)[None, :]  # [1, hd]
    angles = b.op("Mul", [pos_f, const("rope/inv_freq", inv_freq)], f"{p}/rope/angles")
    # [seq, 1, hd]: broadcasts over heads in the [batch, seq, heads, hd] layout
    angles = b.op("Unsqueeze", [angles, ints("rope/axis1b", 1)], f"{p}/rope/angles_3d")
    cos = b.op("Cos", [angles], f"{p}/rope/cos")
    sin = b.op("Sin", [angles], f"{p}/rope/sin")
    future = b.op("Greater", [k_pos, pos_col], f"{p}/mask/future")  # [seq, total]
    mask = b.op("Where", [future, const("mask/value", np.array(MASK_VALUE, np.float32)),
                          const("mask/zero", np.array(0.0, np.float32))], f"{p}/mask/bias")

    # rotate_half(t) = concat(-t[..., hd/2:], t[..., :hd/2]) = t @ rotate (exact: one +-1 per
    # column)
    rotate = np.zeros((hd, hd), np.float32)
    rotate[half:, :half] = -np.eye(half, dtype=np.float32)
    rotate[:half, half:] = np.eye(half, dtype=np.float32)
    rotate_name = const("rope/rotate_half", rotate)

    def rope(t: str, name: str) -> str:  # t: [batch, seq, n, hd]
        rot = b.op("MatMul", [t, rotate_name], f"{p}/{name}/rotate_half")
        return b.op("Add", [b.op("Mul", [t, cos], f"{p}/{name}/cos_part"),
                            b.op("Mul", [rot, sin], f"{p}/{name}/sin_part")],
                    f"{p}/{name}/rope")

    q = rope(q, "q")
    k = rope(k, "k")
    k_new = b.op("Transpose", [k], f"{p}/k/heads", perm=[0, 2, 1, 3])  # [B, kv, T, hd]
    keys = b.op("Concat", [f"past_key_{i}", k_new], f"present_key_{i}", axis=2)

    # query head h uses kv head h // group (HF repeat_kv): group the query heads per kv head
    q = b.op("Reshape", [q, ints("q/group_shape", 0, 0, kv, group, hd)], f"{p}/q/grouped")
    q = b.op("Transpose", [q], f"{p}/q/heads", perm=[0, 2, 3, 1, 4])  # [B, kv, g, T, hd]
    keys_g = b.op("Unsqueeze", [keys, ints("attn/group_axis", 2)], f"{p}/attn/keys_g")
    # [B, kv, 1, hd, S]; onnxruntime folds this transpose into the MatMul (FusedMatMul)
    keys_t = b.op("Transpose", [keys_g], f"{p}/attn/keys_t", perm=[0, 1, 2, 4, 3])
    scores = b.op("MatMul", [q, keys_t], f"{p}/attn/scores")  # [B, kv, g, T, S]
    scores = b.op("Mul", [scores, const("attn/scale", np.array(1.0 / np.sqrt(hd), np.float32))],
                  f"{p}/attn/scaled")
    scores = b.op("Add", [scores, mask], f"{p}/attn/masked")
    probs = b.op("Softmax", [scores], f"{p}/attn/probs", axis=-1)
    values_g = b.op("Unsqueeze", [values, ints("attn/group_axis_v", 2)], f"{p}/attn/values_g")
    ctx = b.op("MatMul", [probs, values_g], f"{p}/attn/context")  # [B, kv, g, T, hd]
    ctx = b.op("Transpose", [ctx], f"{p}/attn/context_t", perm=[0, 3, 1, 2, 4])
    ctx = b.op("Reshape", [ctx, ints("attn/merge_shape", 0, 0, heads * hd)],
               f"{p}/attn/context_merged")
    h = b.op("Add", [x, linear(ctx, "attn_output", "attn/out")], f"{p}/attn/residual")

    # --- SwiGLU feed-forward ---
    normed = _rms_norm(b, cfg, h, b.const(f"{src}.ffn_norm.weight", w["ffn_norm"]), f"{p}/ffn")
    gate = linear(normed, "ffn_gate", "ffn/gate")
    gate = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/ffn/gate_sigmoid")],
                f"{p}/ffn/gate_silu")
    up = linear(normed, "ffn_up", "ffn/up")
    down = linear(b.op("Mul", [gate, up], f"{p}/ffn/gated"), "ffn_down", "ffn/down")
    return b.op("Add", [h, down], f"hidden_{i}")
