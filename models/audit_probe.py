"""Decrypt-then-probe for ``ee-encoder/1`` (issue 15): at every hidden state a node of the
deployment receives, a node that recovered the key (exact weight matching recovers the hidden
permutation exactly, models/audit.py) un-permutes what it received and reads the tokens with a
linear probe it trained on public text run through the public plaintext model.

Each node shard's hidden input is captured while the deployment runs in-process, exactly as the
client would send it (head, then the EE node shards); the probe's training rows are the
plaintext model's tensor of the same name for other public sentences. A later node shard gets
a hidden state several layers deep, where nearest-embedding reading no longer applies: this is
the attack for it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from models.audit_attacks import RidgeProbe, apply_perm
from models.manifest import Manifest, ShardSpec
from models.pipeline import Pipeline, Tensors
from models.tokenizer import TextTokenizer

PUBLIC_FACTOR = 4  # public training sentences per held-out sentence (at least 200)


def hidden_input(shard: ShardSpec) -> str:
    """The residual-stream input of an encoder node shard: its one rank-3 float input."""
    names = [t.name for t in shard.inputs if t.dtype == "float32" and len(t.shape) == 3]
    if len(names) != 1:
        raise ValueError(f"shard {shard.index} has {len(names)} rank-3 float inputs, not one")
    return names[0]


def node_inputs(manifest: Manifest, feeds: Tensors) -> dict[int, np.ndarray]:
    """Each node shard's hidden input (by shard index) when ``manifest`` runs on ``feeds``
    in-process."""
    full = Pipeline(manifest, spin=False)
    seen: dict[int, np.ndarray] = {}

    def capture(shard: ShardSpec, shard_feeds: Tensors) -> Tensors:
        seen[shard.index] = shard_feeds[hidden_input(shard)]
        return full.run_local(shard, shard_feeds)

    Pipeline(manifest, node_runner=capture, spin=False).run(
        {t.name: feeds[t.name] for t in manifest.inputs})
    return seen


@dataclass(frozen=True)
class PublicStates:
    """Public sentences run through the plaintext model: each node shard's hidden input (by
    shard index), and the token ids and rows a probe trains on (real, non-special tokens)."""

    states: dict[int, np.ndarray]
    ids: np.ndarray  # [batch, seq]
    rows: np.ndarray  # [batch, seq] bool

    @classmethod
    def of(cls, plain: Manifest, tokenizer: TextTokenizer, public: Sequence[str],
           special: Collection[int]) -> PublicStates:
        feeds = tokenizer(list(public))
        ids = feeds["input_ids"]
        return cls(node_inputs(plain, feeds), ids,
                   (feeds["attention_mask"] == 1) & ~np.isin(ids, list(special)))

    def probe(self, index: int, rng: np.random.Generator) -> RidgeProbe:
        """A ridge probe reading token ids from node shard ``index``'s plaintext input."""
        return RidgeProbe(self.states[index][self.rows].astype(np.float64),
                          self.ids[self.rows], rng)


def probe_rows(deploy: Manifest, plain: Manifest, tokenizer: TextTokenizer,
               test_feeds: Tensors, counted: np.ndarray, public: Sequence[str],
               hidden_perm: np.ndarray, special: set[int], rng: np.random.Generator,
               ) -> list[tuple[str, Callable[[], tuple[float, dict]]]]:
    """One (label, run) per node shard; ``run()`` gives the share of held-out tokens read and
    details. ``counted``: the held-out positions scored (real, non-special tokens);
    ``hidden_perm``: the hidden permutation the node recovered."""
    received = node_inputs(deploy, test_feeds)
    pub = PublicStates.of(plain, tokenizer, public, special)
    truth = test_feeds["input_ids"][counted]
    out = []
    for enc, pl in zip(deploy.node_shards, plain.node_shards, strict=True):
        name = hidden_input(enc)

        def run(enc: ShardSpec = enc, pl: ShardSpec = pl, name: str = name,
                ) -> tuple[float, dict]:
            decrypted = apply_perm(received[enc.index], hidden_perm)
            probe = pub.probe(pl.index, rng)
            read = probe.predict(decrypted[counted].astype(np.float64))
            return float(np.mean(read == truth)), {
                "tokens": int(truth.size), "shard": enc.index, "input": name,
                "train_sentences": len(public), "train_rows": int(pub.rows.sum()),
                "classes": len(probe.classes),
                # a probe names only tokens it saw: the ceiling of this attack here
                "coverage": float(np.mean(np.isin(truth, probe.classes))),
                "note": f"the node un-permutes its {name} with the recovered key and reads it "
                        "with a ridge probe trained on public text's plaintext " + name}

        out.append((f"decrypt-then-probe [{name}]", run))
    return out


__all__ = ["PUBLIC_FACTOR", "PublicStates", "hidden_input", "node_inputs", "probe_rows"]
