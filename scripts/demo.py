"""The veilnet demo (``make demo``): an encrypted MiniLM query, in one process.

1. import all-MiniLM-L6-v2 as content-addressed ONNX shards (client head, 2 node shards, tail);
2. encrypt the node shards with a fresh secret key (equivariant encryption, ee-encoder/1);
3. embed a few sentences through the encrypted pipeline and through the plaintext model;
4. print both cosine-similarity matrices and how far apart they are.

Until the testnet lands, the "nodes" are onnxruntime sessions in this process that load only the
encrypted node shards. Work files go to --dir (default: demo-data/ in the repository).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from models import Pipeline, encrypt_model_dir, import_minilm

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Encrypted inference keeps activations private.",
]


def log(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def matrix(title: str, sims: np.ndarray) -> str:
    lines = [title, "      " + " ".join(f"  s{j}  " for j in range(len(sims)))]
    for i, row in enumerate(sims):
        lines.append(f"  s{i}  " + " ".join(f"{v:6.3f} " for v in row))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-data"),
                        help="work directory (default demo-data/)")
    parser.add_argument("--fresh", action="store_true", help="re-import and re-encrypt")
    args = parser.parse_args()
    model_dir, deploy_dir = args.dir / "minilm", args.dir / "deploy"
    if args.fresh and args.dir.exists():
        shutil.rmtree(args.dir)

    if not (model_dir / "manifest.json").is_file():
        log(f"importing all-MiniLM-L6-v2 into {model_dir}")
        import_minilm(model_dir, node_shards=2, progress=log)
    if not (deploy_dir / "manifest.json").is_file():
        log(f"encrypting node shards into {deploy_dir}")
        encrypt_model_dir(model_dir, deploy_dir, progress=log)

    plain = Pipeline(model_dir)
    encrypted = Pipeline(deploy_dir)
    start = time.perf_counter()
    enc = encrypted.embed(SENTENCES)
    elapsed = time.perf_counter() - start
    ref = plain.embed(SENTENCES)

    print("Sentences:")
    for i, s in enumerate(SENTENCES):
        print(f"  s{i}: {s}")
    print()
    print(f"Deployment {encrypted.manifest.cid} (encryption {encrypted.manifest.encryption})")
    for shard in encrypted.manifest.shards:
        where = "node (encrypted weights)" if shard.role == "node" else "client"
        print(f"  shard {shard.index} {shard.role:12} {shard.cid}  runs on: {where}")
    print()
    print(matrix("Cosine similarity, encrypted pipeline:", enc @ enc.T))
    print()
    print(matrix("Cosine similarity, plaintext model:", ref @ ref.T))
    print()
    cos = np.sum(enc * ref, axis=1) / (np.linalg.norm(enc, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"max |encrypted - plaintext| = {np.abs(enc - ref).max():.2e}; "
          f"min cosine = {cos.min():.7f}; encrypted pipeline took {elapsed * 1000:.0f} ms "
          f"for {len(SENTENCES)} sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
