"""One forward call of a split decoder, with each node shard's KV cache held by whoever runs it.

A decoder manifest (``extra.config.family == "llama-decoder"``) lists its KV cache in
``extra.kv_cache``: ``past[k]`` is fed back as ``present[k]`` of the previous call. A node shard
reads some ``past_*`` tensors and writes the matching ``present_*``; over the network the node
keeps them (a session, docs/protocol.md ``/veilnet/session/1``), so the client sends each node
shard only its other inputs (the residual stream) and gets back only its other outputs.

``DecoderLayout`` says which inputs and outputs of each shard are cache. ``walk`` is the shard
walk of one call (prefill or new tokens), written once: a generator yielding each shard with
its non-cache feeds and receiving its non-cache outputs, like ``Pipeline._steps``. Callers
drive it with plain calls (``LocalDecoder``, the in-process reference) or awaitable ones (the
client SDK, whose node hops are sessions on nodes).
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.manifest import Manifest, ManifestError, ShardSpec, TensorSpec
from models.pipeline import Pipeline, Tensors

DECODER_FAMILY = "llama-decoder"


@dataclass(frozen=True)
class DecoderLayout:
    """Which tensors of a decoder manifest are KV cache, per shard."""

    manifest: Manifest
    past_to_present: Mapping[str, str]

    @classmethod
    def of(cls, manifest: Manifest) -> DecoderLayout:
        """The layout of ``manifest``; ManifestError when it is not a decoder with a KV cache."""
        config = manifest.extra.get("config") or {}
        kv = manifest.extra.get("kv_cache") or {}
        past, present = kv.get("past"), kv.get("present")
        if config.get("family") != DECODER_FAMILY or not isinstance(past, list) \
                or not isinstance(present, list) or len(past) != len(present) or not past:
            raise ManifestError(f"{manifest.name}: not a decoder with a KV cache (generation "
                                "needs a model imported with 'veilnet model import smollm2' or "
                                "'... gguf')")
        return cls(manifest, dict(zip(past, present, strict=True)))

    @property
    def config(self) -> dict:
        return dict(self.manifest.extra["config"])

    @functools.cached_property
    def present_names(self) -> frozenset[str]:
        return frozenset(self.past_to_present.values())

    def cache_pairs(self, shard: ShardSpec) -> list[tuple[str, str]]:
        """(past, present) names ``shard`` reads and writes."""
        return [(t.name, self.past_to_present[t.name]) for t in shard.inputs
                if t.name in self.past_to_present]

    def hop_inputs(self, shard: ShardSpec) -> list[TensorSpec]:
        return [t for t in shard.inputs if t.name not in self.past_to_present]

    def hop_outputs(self, shard: ShardSpec) -> list[TensorSpec]:
        present = self.present_names
        return [t for t in shard.outputs if t.name not in present]

    @property
    def logits(self) -> str:
        names = [t.name for t in self.manifest.outputs if t.name not in self.present_names]
        if len(names) != 1:
            raise ManifestError(f"{self.manifest.name}: expected one output besides the KV "
                                f"cache, got {names}")
        return names[0]

    def empty_past(self, shard: ShardSpec, batch: int) -> Tensors:
        """Zero-length past tensors for ``shard``'s cache inputs (the first call)."""
        out: Tensors = {}
        for t in shard.inputs:
            if t.name in self.past_to_present:
                dims = [batch if i == 0 else (0 if not isinstance(d, int) else d)
                        for i, d in enumerate(t.shape)]
                out[t.name] = np.zeros(dims, np.float32)
        return out


def walk(layout: DecoderLayout, input_ids: np.ndarray,
         ) -> Generator[tuple[ShardSpec, Tensors], Tensors, np.ndarray]:
    """Yield each shard with its non-cache feeds, receive its non-cache outputs; return the
    logits ``[batch, seq, vocab]`` of this call's tokens."""
    env: Tensors = {"input_ids": input_ids}
    for shard in layout.manifest.shards:
        feeds = {t.name: env[t.name] for t in shard.inputs
                 if t.name not in layout.past_to_present}
        env.update((yield shard, feeds))
    return env[layout.logits]


class LocalHop:
    """A node shard run in this process with its KV cache (what a node's session does)."""

    def __init__(self, pipeline: Pipeline, layout: DecoderLayout, shard: ShardSpec) -> None:
        self.pipeline, self.layout, self.shard = pipeline, layout, shard
        self.pairs = layout.cache_pairs(shard)
        self.cache: Tensors | None = None

    def __call__(self, feeds: Tensors) -> Tensors:
        batch = int(next(iter(feeds.values())).shape[0])
        past = self.cache if self.cache is not None else self.layout.empty_past(self.shard, batch)
        out = self.pipeline.run_local(self.shard, {**feeds, **past})
        self.cache = {p: out.pop(q) for p, q in self.pairs}
        return out


class LocalDecoder:
    """A decoder deployment or model directory run wholly in-process, one sequence at a time:
    ``forward(ids)`` feeds new tokens and returns the last position's logits. The reference
    that network generation is checked against, and the in-process baseline of bench/."""

    def __init__(self, manifest: Manifest | Path, threads: int | None = None,
                 spin: bool | None = None) -> None:
        self.pipeline = Pipeline(manifest, threads=threads, spin=spin)
        self.layout = DecoderLayout.of(self.pipeline.manifest)
        self.reset()

    def reset(self) -> None:
        self.hops = {s.index: LocalHop(self.pipeline, self.layout, s)
                     for s in self.layout.manifest.node_shards}

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``[vocab]`` after feeding ``ids`` (the prompt, then one token at a time)."""
        steps = walk(self.layout, np.array([list(ids)], np.int64))
        try:
            shard, feeds = next(steps)
            while True:
                run = self.hops.get(shard.index) if shard.role == "node" else None
                outputs = run(feeds) if run else self.pipeline.run_local(shard, feeds)
                shard, feeds = steps.send(outputs)
        except StopIteration as done:
            return np.asarray(done.value)[0, -1]

    def greedy(self, prompt: Sequence[int], max_tokens: int,
               stop: Sequence[int] = ()) -> list[int]:
        """Greedy token ids after ``prompt`` (starting from an empty cache)."""
        self.reset()
        out: list[int] = []
        logits = self.forward(prompt)
        while len(out) < max_tokens:
            out.append(int(np.argmax(logits)))
            if out[-1] in stop:
                break
            logits = self.forward(out[-1:])
        return out


__all__ = ["DECODER_FAMILY", "DecoderLayout", "LocalDecoder", "LocalHop", "walk"]
