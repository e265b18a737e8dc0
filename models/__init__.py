"""Models as content-addressed ONNX shards: import (MiniLM, user ONNX, llama GGUF decoders such as
SmolLM2), split, manifests, equivariant encryption of node shards (``ee-encoder/1``,
``ee-decoder/1``), masked offload of an encoder's linear layers (``masked/1``), and running shards
with onnxruntime."""

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
