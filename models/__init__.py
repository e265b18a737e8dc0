"""Models as content-addressed ONNX shards: import (MiniLM, user ONNX, llama GGUF decoders such as
SmolLM2), split, manifests, equivariant encryption of node shards (``ee-encoder/1``,
``ee-decoder/1``), masked offload of an encoder's linear layers (``masked/1``), and running shards
with onnxruntime."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported from their module on first use (PEP 562), so a process that needs only a
# few (a node: manifests, runtime sessions) does not import onnx and the graph builders: that
# was about 0.9 s of every node's and every CLI call's start-up. Written by hand: 20 lines,
# where scientific-python's lazy_loader would add a dependency for the same.
_WHERE: dict[str, str] = {
    "BertConfig": "models.bert_graph",
    "build_bert_sentence_encoder": "models.bert_graph",
    "cid_of_bytes": "models.cid",
    "cid_of_digest": "models.cid",
    "cid_of_file": "models.cid",
    "is_valid_cid": "models.cid",
    "DecoderKey": "models.ee_decoder_key",
    "Flat": "models.ee_layouts",
    "HeadPerm": "models.ee_layouts",
    "Heads": "models.ee_layouts",
    "Layout": "models.ee_layouts",
    "Plain": "models.ee_layouts",
    "EEPlan": "models.ee_plan",
    "EncryptionError": "models.ee_plan",
    "plan_encryption": "models.ee_plan",
    "SCHEME": "models.encrypt",
    "encrypt_model_dir": "models.encrypt",
    "GgufError": "models.gguf_model",
    "GgufModel": "models.gguf_model",
    "read_gguf": "models.gguf_model",
    "ImportError_": "models.importer",
    "OutputDirError": "models.importer",
    "import_minilm": "models.importer",
    "import_onnx": "models.importer",
    "load_onnx": "models.importer",
    "minilm_cuts": "models.importer",
    "LlamaConfig": "models.llama_graph",
    "build_llama_decoder": "models.llama_graph",
    "import_gguf": "models.llama_import",
    "import_smollm2": "models.llama_import",
    "ENCRYPTIONS": "models.manifest",
    "MASKED": "models.manifest",
    "Manifest": "models.manifest",
    "ManifestError": "models.manifest",
    "ShardSpec": "models.manifest",
    "TensorSpec": "models.manifest",
    "BITS_PER_TOKEN": "models.masked",
    "MaskedInputError": "models.masked",
    "MaskedPlan": "models.masked",
    "bucket_length": "models.masked",
    "encrypt_masked": "models.masked",
    "mask_sigma": "models.masked",
    "node_weight": "models.masked",
    "pad_to_bucket": "models.masked",
    "ModelSourceError": "models.minilm",
    "build_minilm": "models.minilm",
    "locate": "models.minilm",
    "AsyncRunner": "models.pipeline",
    "NodeRunner": "models.pipeline",
    "Pipeline": "models.pipeline",
    "ReceivedFormatError": "models.received",
    "RecordedInput": "models.received",
    "RecordedView": "models.received",
    "read_views": "models.received",
    "ShardInputError": "models.runtime",
    "ShardSession": "models.runtime",
    "SplitError": "models.split",
    "split_model": "models.split",
    "TextTokenizer": "models.tokenizer",
}

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from models.bert_graph import BertConfig, build_bert_sentence_encoder
    from models.cid import cid_of_bytes, cid_of_digest, cid_of_file, is_valid_cid
    from models.ee_decoder_key import DecoderKey
    from models.ee_layouts import Flat, HeadPerm, Heads, Layout, Plain
    from models.ee_plan import EEPlan, EncryptionError, plan_encryption
    from models.encrypt import SCHEME, encrypt_model_dir
    from models.gguf_model import GgufError, GgufModel, read_gguf
    from models.importer import (
        ImportError_,
        OutputDirError,
        import_minilm,
        import_onnx,
        load_onnx,
        minilm_cuts,
    )
    from models.llama_graph import LlamaConfig, build_llama_decoder
    from models.llama_import import import_gguf, import_smollm2
    from models.manifest import ENCRYPTIONS, MASKED, Manifest, ManifestError, ShardSpec, TensorSpec
    from models.masked import (
        BITS_PER_TOKEN,
        MaskedInputError,
        MaskedPlan,
        bucket_length,
        encrypt_masked,
        mask_sigma,
        node_weight,
        pad_to_bucket,
    )
    from models.minilm import ModelSourceError, build_minilm, locate
    from models.pipeline import AsyncRunner, NodeRunner, Pipeline
    from models.received import ReceivedFormatError, RecordedInput, RecordedView, read_views
    from models.runtime import ShardInputError, ShardSession
    from models.split import SplitError, split_model
    from models.tokenizer import TextTokenizer


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "BITS_PER_TOKEN",
    "ENCRYPTIONS",
    "MASKED",
    "SCHEME",
    "AsyncRunner",
    "BertConfig",
    "DecoderKey",
    "EEPlan",
    "EncryptionError",
    "Flat",
    "GgufError",
    "GgufModel",
    "HeadPerm",
    "Heads",
    "ImportError_",
    "Layout",
    "LlamaConfig",
    "Manifest",
    "ManifestError",
    "MaskedInputError",
    "MaskedPlan",
    "ModelSourceError",
    "NodeRunner",
    "OutputDirError",
    "Pipeline",
    "Plain",
    "ReceivedFormatError",
    "RecordedInput",
    "RecordedView",
    "ShardInputError",
    "ShardSession",
    "ShardSpec",
    "SplitError",
    "TensorSpec",
    "TextTokenizer",
    "bucket_length",
    "build_bert_sentence_encoder",
    "build_llama_decoder",
    "build_minilm",
    "cid_of_bytes",
    "cid_of_digest",
    "cid_of_file",
    "encrypt_masked",
    "encrypt_model_dir",
    "import_gguf",
    "import_minilm",
    "import_onnx",
    "import_smollm2",
    "is_valid_cid",
    "load_onnx",
    "locate",
    "mask_sigma",
    "minilm_cuts",
    "node_weight",
    "pad_to_bucket",
    "plan_encryption",
    "read_gguf",
    "read_views",
    "split_model",
]
