"""WordPiece tokenization for BERT-family models with the Hugging Face ``tokenizers`` library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class TextTokenizer:
    """Turns texts into the int64 ``input_ids``/``attention_mask``/``token_type_ids`` arrays.

    Pads to the longest text in the batch and truncates to ``max_length`` tokens, as
    sentence-transformers does (the tokenizer.json's own fixed padding is replaced).
    """

    def __init__(self, path: Path, max_length: int) -> None:
        self.path = Path(path)
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        pad_id = self._tok.token_to_id("[PAD]")
        self._tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str) or not texts:
            raise ValueError("expected a non-empty list of texts")
        encodings = self._tok.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
