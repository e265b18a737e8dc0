"""Run a sharded model end to end: client head, node shards (with the client's own ``client``
shards between them, if any), client tail.

The walk over the shards (in manifest order, each shard fed by name from the model inputs and
the outputs of earlier shards) is written once, in ``Pipeline._steps``; ``run`` drives it with
plain calls and ``run_async`` with awaitable ones. ``Pipeline`` runs the node shards in-process
by default. A caller that runs them elsewhere passes a ``node_runner`` (``run``) or an async
one (``run_async``: the client SDK, which sends each node-shard hop to the network); then the
node shards are not loaded here (``remote_nodes``), and the client shards always are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from pathlib import Path

import numpy as np

from models.manifest import Manifest, ManifestError, ShardSpec
from models.runtime import ShardSession
from models.tokenizer import TextTokenizer

Tensors = dict[str, np.ndarray]
NodeRunner = Callable[[ShardSpec, Tensors], Tensors]
AsyncRunner = Callable[[ShardSpec, Tensors], Awaitable[Tensors]]
# shards the client runs itself; "client" shards stand between node shards (ee-decoder/1)
CLIENT_ROLES = ("client-head", "client", "client-tail")


class Pipeline:
    """A plaintext model directory or an encrypted deployment, ready to run."""

    def __init__(self, manifest: Manifest | Path, node_runner: NodeRunner | None = None,
                 threads: int | None = None, spin: bool | None = None, *,
                 remote_nodes: bool = False) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.remote_nodes = remote_nodes or node_runner is not None
        roles = CLIENT_ROLES if self.remote_nodes else (*CLIENT_ROLES, "node")
        problems = self.manifest.verify_files(roles)
        if problems:
            raise ManifestError("; ".join(problems))
        loaded = [s for s in self.manifest.shards if s.role in roles]
        if spin is None:
            # onnxruntime's idle workers spin after each run: that helps one session called in
            # a loop and hurts several run one after another, each session's spinning threads
            # taking the cores the next one needs (bench/generate.py: the split SmolLM2 decodes
            # at 19.7 ms/token without spinning, 21.6 with, p95 21.5 against 58.5)
            spin = len(loaded) == 1
        self._sessions = {
            s.index: ShardSession(self.manifest.shard_path(s), s, threads, spin) for s in loaded
        }
        self._node_runner = node_runner
        self.tokenizer: TextTokenizer | None = None
        tok = self.manifest.extra.get("tokenizer")
        if tok and "max_length" in tok:  # a sentence encoder's (a decoder's is not a batch one)
            assert self.manifest.path is not None
            self.tokenizer = TextTokenizer(self.manifest.path.parent / tok["path"],
                                           int(tok["max_length"]))

    def run_local(self, shard: ShardSpec, feeds: Mapping[str, np.ndarray]) -> Tensors:
        """Run one shard held in this process (the client shards, or all without a runner)."""
        session = self._sessions.get(shard.index)
        if session is None:
            raise ManifestError(f"shard {shard.index} ({shard.role}) runs elsewhere: pass a "
                                "node runner")
        return session.run(feeds)

    def _steps(self, inputs: Mapping[str, np.ndarray],
               ) -> Generator[tuple[ShardSpec, Tensors], Tensors, Tensors]:
        """Yield each shard with its feeds, in order; receive its outputs; return the model's
        outputs by name."""
        env: Tensors = dict(inputs)
        for shard in self.manifest.shards:
            env.update((yield shard, {t.name: env[t.name] for t in shard.inputs}))
        return {t.name: env[t.name] for t in self.manifest.outputs}

    def run(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Model inputs by name -> model outputs by name."""
        steps = self._steps(inputs)
        try:
            shard, feeds = next(steps)
            while True:
                if shard.role == "node" and self._node_runner is not None:
                    outputs = self._node_runner(shard, feeds)
                else:
                    outputs = self.run_local(shard, feeds)
                shard, feeds = steps.send(outputs)
        except StopIteration as done:
            return done.value

    async def run_async(self, inputs: Mapping[str, np.ndarray], node_runner: AsyncRunner,
                        local_runner: AsyncRunner) -> Tensors:
        """``run`` with awaitable runners: ``node_runner`` for node shards, ``local_runner``
        for the others (e.g. ``run_local`` in a worker thread)."""
        steps = self._steps(inputs)
        try:
            shard, feeds = next(steps)
            while True:
                runner = node_runner if shard.role == "node" else local_runner
                shard, feeds = steps.send(await runner(shard, feeds))
        except StopIteration as done:
            return done.value

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings for ``texts`` (models with a tokenizer)."""
        if self.tokenizer is None:
            raise ManifestError(f"{self.manifest.name}: the manifest names no tokenizer")
        return self.run(self.tokenizer(texts))[self.manifest.outputs[0].name]
