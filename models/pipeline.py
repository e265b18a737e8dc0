"""Run a sharded model end to end: client head, node shards, client tail.

``Pipeline`` runs the node shards in-process by default. The client SDK passes a ``node_runner``
that sends each node-shard hop to the network instead; the client shards always run here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from models.manifest import Manifest, ManifestError, ShardSpec
from models.runtime import ShardSession
from models.tokenizer import TextTokenizer

NodeRunner = Callable[[ShardSpec, dict[str, np.ndarray]], dict[str, np.ndarray]]


class Pipeline:
    """A plaintext model directory or an encrypted deployment, ready to run."""

    def __init__(self, manifest: Manifest | Path, node_runner: NodeRunner | None = None,
                 threads: int | None = None, spin: bool = True) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        roles = ("client-head", "client-tail") if node_runner else ("client-head", "node",
                                                                     "client-tail")
        problems = self.manifest.verify_files(roles)
        if problems:
            raise ManifestError("; ".join(problems))
        self._sessions = {
            s.index: ShardSession(self.manifest.shard_path(s), s, threads, spin)
            for s in self.manifest.shards if s.role in roles
        }
        self._node_runner = node_runner or self.run_local
        self.tokenizer: TextTokenizer | None = None
        tok = self.manifest.extra.get("tokenizer")
        if tok:
            assert self.manifest.path is not None
            self.tokenizer = TextTokenizer(self.manifest.path.parent / tok["path"],
                                           int(tok["max_length"]))

    def run_local(self, shard: ShardSpec, feeds: Mapping[str, np.ndarray],
                  ) -> dict[str, np.ndarray]:
        """Run one shard held in this process (the client shards, or all without a runner)."""
        return self._sessions[shard.index].run(feeds)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs by name -> model outputs by name."""
        env: dict[str, np.ndarray] = dict(inputs)
        for shard in self.manifest.shards:
            feeds = {t.name: env[t.name] for t in shard.inputs}
            if shard.role == "node":
                outputs = self._node_runner(shard, feeds)
            else:
                outputs = self.run_local(shard, feeds)
            env.update(outputs)
        return {t.name: env[t.name] for t in self.manifest.outputs}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings for ``texts`` (models with a tokenizer)."""
        if self.tokenizer is None:
            raise ManifestError(f"{self.manifest.name}: the manifest names no tokenizer")
        return self.run(self.tokenizer(texts))[self.manifest.outputs[0].name]
