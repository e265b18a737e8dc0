"""``masked/1``: masked offload of a BERT encoder's linear layers (DESIGN.md section 6).

Nodes run only the linear layers: per layer four bias-free float64 ``MatMul`` shards (``qkv``,
``o``, ``up``, ``down``; models/masked_graph.py). The client runs everything else (embeddings,
biases, attention, GELU, residuals, LayerNorms, pooling) in ``client`` shards between them, and
sends each node shard its input rows ``x`` masked with fresh Gaussian noise: ``x + r``,
``r ~ N(0, sigma^2 I_d)`` drawn per query. A second node of another operator computes ``r W``;
the client subtracts it. The weights are public, so there is no key and no key.json: privacy
rests on the two nodes not colluding, and on the noise.

How much noise. A row ``x`` with ``||x|| <= B`` sent as ``x + r`` is a Gaussian channel with
power constraint ``B^2``: its mutual information is at most ``(d/2) log2(1 + B^2/(d sigma^2))
<= B^2 / (2 sigma^2 ln 2)`` bits. One token's row reaches nodes in ``V = 4 * num_layers`` views
per query (each node shard's input holds one row per token, each masked afresh). With

    sigma = B * sqrt(V / (2 ln 2 * BITS_PER_TOKEN))

each view leaks at most ``BITS_PER_TOKEN / V`` bits, all views together at most
``BITS_PER_TOKEN`` (1e-4) bits per token per query. ``B`` is a provable bound on the norm of
every row of the shard's input, from the public weights alone (``input_norm_bounds``).

Sequence lengths are padded to a few buckets (``bucket_length``, ``pad_to_bucket``) so that the
number of rows a node sees says little about the text's length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

import models.masked_graph as mg
from errors import InputError
from models.cid import cid_of_file
from models.deploy_writer import load_plaintext, write_deployment
from models.ee_decoder import PlannedShard
from models.ee_plan import EncryptionError
from models.importer import check_output_dir, tensor_spec
from models.manifest import MASKED, Manifest, ManifestError, ShardSpec
from models.progress import Progress, counted, no_progress

BITS_PER_TOKEN = 1e-4  # information bound per token per query, over all views (bits)
MASK_FORMAT = "veilnet-mask/1"
BASE_BUCKETS = (16, 32, 64, 128, 256, 512)  # capped at the model's positions
FAMILY = "bert-encoder"
PADDED = mg.MODEL_INPUTS  # the [batch, seq] inputs pad_to_bucket pads with 0s


class MaskedInputError(InputError):
    """An input a masked/1 deployment cannot take (a sequence longer than its largest bucket)."""


@dataclass(frozen=True)
class ShardMask:
    input_norm_bound: float  # B: every row of the node shard's input has norm <= B
    sigma: float  # the mask's standard deviation per coordinate


@dataclass(frozen=True)
class MaskedPlan:
    """``extra["masked"]`` of a masked/1 deployment."""

    bits_per_token: float
    views_per_row: int
    buckets: tuple[int, ...]
    shards: dict[str, ShardMask]  # node shard CID -> its mask

    def to_json(self) -> dict[str, Any]:
        return {"bits_per_token": self.bits_per_token, "views_per_row": self.views_per_row,
                "buckets": list(self.buckets),
                "shards": {cid: {"input_norm_bound": m.input_norm_bound, "sigma": m.sigma}
                           for cid, m in self.shards.items()},
                "mask": MASK_FORMAT}

    @classmethod
    def of(cls, manifest: Manifest) -> MaskedPlan:
        where = f"{manifest.path or manifest.name}"
        if manifest.encryption != MASKED:
            raise ManifestError(f"{where}: not a {MASKED} deployment ({manifest.encryption})")
        doc = manifest.extra.get("masked")
        try:
            if doc["mask"] != MASK_FORMAT:
                raise ManifestError(f"{where}: masked.mask is {doc['mask']!r}, expected "
                                    f"{MASK_FORMAT!r}")
            buckets = tuple(int(b) for b in doc["buckets"])
            shards = {cid: ShardMask(float(m["input_norm_bound"]), float(m["sigma"]))
                      for cid, m in doc["shards"].items()}
            plan = cls(float(doc["bits_per_token"]), int(doc["views_per_row"]), buckets, shards)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where}: malformed 'masked' field: {exc!r}") from exc
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ManifestError(f"{where}: masked.buckets {list(buckets)} must be increasing "
                                "positive lengths")
        nodes = {s.cid for s in manifest.node_shards}
        if set(shards) != nodes:
            raise ManifestError(f"{where}: masked.shards must name every node shard, no other")
        if any(not (m.sigma > 0 and m.input_norm_bound > 0) for m in shards.values()):
            raise ManifestError(f"{where}: masked.shards: bounds and sigmas must be positive")
        return plan


# --- accessors --------------------------------------------------------------------------------


def _cid(shard: ShardSpec | str) -> str:
    return shard if isinstance(shard, str) else shard.cid


def mask_sigma(manifest: Manifest, shard: ShardSpec | str) -> float:
    """The standard deviation of the mask for node shard ``shard`` (a spec or its CID)."""
    mask = MaskedPlan.of(manifest).shards.get(_cid(shard))
    if mask is None:
        raise ManifestError(f"{_cid(shard)} is not a node shard of this {MASKED} deployment")
    return mask.sigma


def bucket_length(manifest: Manifest, seq_len: int) -> int:
    """The smallest bucket that holds ``seq_len`` tokens."""
    buckets = MaskedPlan.of(manifest).buckets
    if seq_len < 1:
        raise MaskedInputError(f"sequence length {seq_len}: expected at least one token")
    for b in buckets:
        if b >= seq_len:
            return b
    raise MaskedInputError(f"sequence of {seq_len} tokens is longer than the largest bucket "
                           f"({buckets[-1]}) of {manifest.name}; truncate it")


def pad_to_bucket(manifest: Manifest, inputs: Mapping[str, np.ndarray],
                  ) -> dict[str, np.ndarray]:
    """``inputs`` with input_ids, attention_mask and token_type_ids ([batch, seq]) padded with
    0s along axis 1 to ``bucket_length`` of their length; other entries unchanged."""
    lengths = {inputs[n].shape[1] for n in PADDED if n in inputs and inputs[n].ndim == 2}
    if len(lengths) != 1 or any(n in inputs and inputs[n].ndim != 2 for n in PADDED):
        raise MaskedInputError(f"{', '.join(PADDED)} must be [batch, seq] arrays of one length")
    seq = lengths.pop()
    pad = bucket_length(manifest, seq) - seq
    out = dict(inputs)
    for name in PADDED:
        if name in out:
            out[name] = np.pad(out[name], ((0, 0), (0, pad)), constant_values=0)
    return out


def node_weight(manifest: Manifest, shard: ShardSpec | str) -> np.ndarray:
    """The float64 weight ``W`` of a node shard (its one MatMul: ``out = in @ W``), read from
    its file after checking the file against its CID; for the client's Freivalds check."""
    spec = next((s for s in manifest.node_shards if s.cid == _cid(shard)), None)
    if spec is None:
        raise ManifestError(f"{_cid(shard)} is not a node shard of {manifest.name}")
    path = manifest.shard_path(spec)
    if not path.is_file() or cid_of_file(path) != spec.cid:
        raise ManifestError(f"{path}: missing, or does not hash to {spec.cid}")
    graph = onnx.load(str(path)).graph
    if [n.op_type for n in graph.node] != ["MatMul"] or len(graph.initializer) != 1:
        raise ManifestError(f"{path}: a {MASKED} node shard is one MatMul with one weight")
    weight = numpy_helper.to_array(graph.initializer[0])
    if weight.dtype != np.float64 or weight.ndim != 2:
        raise ManifestError(f"{path}: weight is {weight.dtype} {weight.shape}, not float64 2-D")
    return weight


# --- the deployment ---------------------------------------------------------------------------


def sigma_for(bound: float, views: int, bits: float = BITS_PER_TOKEN) -> float:
    """The mask's sigma for rows of norm <= ``bound`` seen in ``views`` views per query."""
    return bound * math.sqrt(views / (2 * math.log(2) * bits))


def ln_bound(gamma: np.ndarray, beta: np.ndarray) -> float:
    """Bound on ||LayerNorm(x)|| for any x: the normalised vector n = (x - mean) / sqrt(var +
    eps) has ||n||^2 = H var / (var + eps) <= H, so ||gamma * n + beta|| <= sqrt(H) max|gamma|
    + ||beta||."""
    g, b = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    return float(math.sqrt(g.size) * np.max(np.abs(g)) + np.linalg.norm(b))


def input_norm_bounds(dims: mg.Dims, w: Mapping[str, np.ndarray]) -> dict[tuple[int, str], float]:
    """Per (layer, kind): B with ||row|| <= B for every row of that node shard's input.

    - qkv/in, up/in are LayerNorm outputs: ``ln_bound`` (layer 0 qkv: embeddings.ln; layer
      l > 0 qkv: layer l-1's ffn_ln; up: the layer's attention_ln).
    - o/in is the attention context: per head h, softmax weights are a convex combination of
      that head's value rows v_j = x_j Wv_h + bv_h, so ||ctx_h|| <= max_j ||v_j|| <= B_qkv
      ||Wv_h||_2 + ||bv_h||, and ||ctx||^2 = sum_h ||ctx_h||^2.
    - down/in is GELU(u), u = x W_up + b_up, |GELU(u)| <= |u| elementwise, so ||GELU(u)|| <=
      B_up ||W_up||_2 + ||b_up||.
    """
    def f64(name: str) -> np.ndarray:
        return np.asarray(w[name], np.float64)

    bounds: dict[tuple[int, str], float] = {}
    dh = dims.head_dim
    for layer in range(dims.layers):
        p = f"layer.{layer}"
        ln = "embeddings.ln" if layer == 0 else f"layer.{layer - 1}.ffn_ln"
        b_qkv = ln_bound(f64(f"{ln}.weight"), f64(f"{ln}.bias"))
        wv, bv = f64(f"{p}.value.weight"), f64(f"{p}.value.bias")
        per_head = [b_qkv * np.linalg.norm(wv[:, h * dh:(h + 1) * dh], 2)
                    + np.linalg.norm(bv[h * dh:(h + 1) * dh]) for h in range(dims.heads)]
        b_up = ln_bound(f64(f"{p}.attention_ln.weight"), f64(f"{p}.attention_ln.bias"))
        bounds[layer, "qkv"] = b_qkv
        bounds[layer, "o"] = float(math.sqrt(sum(x * x for x in per_head)))
        bounds[layer, "up"] = b_up
        bounds[layer, "down"] = float(b_up * np.linalg.norm(f64(f"{p}.ffn_in.weight"), 2)
                                      + np.linalg.norm(f64(f"{p}.ffn_in.bias")))
    return bounds


def read_weights(manifest: Manifest) -> tuple[dict[str, np.ndarray], float]:
    """Every initializer of the model's shards by name, and the LayerNorm epsilon."""
    weights: dict[str, np.ndarray] = {}
    eps: set[float] = set()
    for shard in manifest.shards:
        graph = onnx.load(str(manifest.shard_path(shard))).graph
        for init in graph.initializer:
            weights.setdefault(init.name, numpy_helper.to_array(init))
        for node in graph.node:
            if node.op_type == "LayerNormalization":
                eps.update(a.f for a in node.attribute if a.name == "epsilon")
    if len(eps) != 1:
        raise EncryptionError(f"{manifest.path}: expected one LayerNorm epsilon, found "
                              f"{sorted(eps)}")
    return weights, eps.pop()


def _dims(manifest: Manifest, w: Mapping[str, np.ndarray], eps: float) -> mg.Dims:
    cfg = manifest.extra.get("config") or {}
    try:
        dims = mg.Dims(int(cfg["hidden_size"]), int(cfg["num_heads"]),
                       int(cfg["intermediate_size"]), int(cfg["num_layers"]), eps)
    except (KeyError, TypeError, ValueError) as exc:
        raise EncryptionError(f"{manifest.path}: config lacks a size ({exc!r})") from exc
    h, i = dims.hidden, dims.intermediate
    want = {"embeddings.ln.weight": (h,), "embeddings.ln.bias": (h,)}
    for layer in range(dims.layers):
        p = f"layer.{layer}"
        for name, shape in (("query", (h, h)), ("key", (h, h)), ("value", (h, h)),
                            ("attention_out", (h, h)), ("ffn_in", (h, i)), ("ffn_out", (i, h))):
            want[f"{p}.{name}.weight"], want[f"{p}.{name}.bias"] = shape, shape[1:]
        for ln in ("attention_ln", "ffn_ln"):
            want[f"{p}.{ln}.weight"] = want[f"{p}.{ln}.bias"] = (h,)
    for name, shape in want.items():
        if name not in w or tuple(w[name].shape) != shape:
            got = tuple(w[name].shape) if name in w else "missing"
            raise EncryptionError(f"{manifest.path}: weight {name!r} is {got}, expected {shape}")
    if h % dims.heads:
        raise EncryptionError(f"{manifest.path}: hidden_size {h} is not a multiple of "
                              f"num_heads {dims.heads}")
    return dims


def buckets_for(manifest: Manifest, max_position: int) -> list[int]:
    """BASE_BUCKETS up to the model's positions, plus the tokenizer's max_length."""
    out = {b for b in BASE_BUCKETS if b <= max_position}
    max_length = (manifest.extra.get("tokenizer") or {}).get("max_length")
    if isinstance(max_length, int) and max_length > 0:
        out.add(min(max_length, max_position))
    return sorted(out or {max_position})


def _planned(model: onnx.ModelProto, role: str) -> PlannedShard:
    return PlannedShard(role, model, tuple(tensor_spec(v) for v in model.graph.input),
                        tuple(tensor_spec(v) for v in model.graph.output))


def encrypt_masked(model: Manifest | Path, out_dir: Path,
                   progress: Progress = no_progress) -> Manifest:
    """Write the ``masked/1`` deployment of a bert-encoder model directory to ``out_dir``."""
    check_output_dir(out_dir)
    manifest = load_plaintext(model)
    family = (manifest.extra.get("config") or {}).get("family")
    if family != FAMILY:
        raise EncryptionError(f"{manifest.path}: {MASKED} covers {FAMILY} models (MiniLM); "
                              f"{manifest.name} is of family {family!r}")
    progress(f"reading the weights of {manifest.name} and bounding each linear layer's input")
    weights, eps = read_weights(manifest)
    dims = _dims(manifest, weights, eps)
    bounds = input_norm_bounds(dims, weights)
    views = len(mg.KINDS) * dims.layers
    progress(f"{MASKED}: {views} node shards (float64 MatMuls), {views} client shards")

    def weight(layer: int, kind: str) -> np.ndarray:
        names = {"qkv": ("query", "key", "value"), "o": ("attention_out",),
                 "up": ("ffn_in",), "down": ("ffn_out",)}[kind]
        return np.concatenate([np.asarray(weights[f"layer.{layer}.{n}.weight"], np.float64)
                               for n in names], axis=1)

    after = {"qkv": mg.after_qkv, "o": mg.after_o, "up": mg.after_up, "down": mg.after_down}
    progress("building the client head")
    shards = [_planned(mg.head(dims, weights), "client-head")]
    with counted(progress, "building layers", dims.layers, "layers") as done:
        for layer in range(dims.layers):
            for kind in mg.KINDS:
                shards.append(_planned(mg.node(dims, layer, kind, weight(layer, kind)), "node"))
                shards.append(_planned(after[kind](dims, weights, layer), "client"))
            progress(f"layer {layer}: bounds " + ", ".join(
                f"{k} {bounds[layer, k]:.1f}" for k in mg.KINDS))
            done.advance()
    shards.append(_planned(mg.tail(dims), "client-tail"))
    buckets = buckets_for(manifest, int(weights["embeddings.position"].shape[0]))
    order = [(layer, kind) for layer in range(dims.layers) for kind in mg.KINDS]

    def masked_extra(specs: Sequence[ShardSpec]) -> dict[str, Any]:
        nodes = [s for s in specs if s.role == "node"]
        plan = MaskedPlan(BITS_PER_TOKEN, views, tuple(buckets), {
            s.cid: ShardMask(bounds[at], sigma_for(bounds[at], views))
            for s, at in zip(nodes, order, strict=True)})
        return {"masked": plan.to_json()}

    return write_deployment(manifest, MASKED, shards, None, Path(out_dir), progress,
                            masked_extra)
