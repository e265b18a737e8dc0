"""The attack docs/threat-model.md describes: a node holding the public plaintext weights recovers
the EE key by matching them against its encrypted shard, and can then decrypt what it sees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from crypto import EEKey
from models import Manifest, ShardSession, TextTokenizer, plan_encryption
from models.ee_attack import recover_key


def test_weight_matching_recovers_the_key(minilm_manifest: Manifest,
                                          deployment_manifest: Manifest,
                                          deployment_dir: Path) -> None:
    plain = {s.index: onnx.load(str(minilm_manifest.shard_path(s)))
             for s in minilm_manifest.node_shards}
    enc = {s.index: onnx.load(str(deployment_manifest.shard_path(s)))
           for s in deployment_manifest.node_shards}
    # The attacker plans from the public plaintext shards alone; the key is used only to score.
    plan = plan_encryption(sorted(plain.items()))
    key = EEKey.load(deployment_dir / "client" / "key.json")
    report = recover_key(plan, plain, enc, key)
    summary = report.summary()
    print("attack:", json.dumps(summary))  # the figures quoted in docs/threat-model.md
    assert summary["hidden_perm_recovered"] == 1.0
    assert summary["ffn_perms_recovered_min"] == 1.0
    assert summary["head_perms_recovered_min"] == 1.0
    assert summary["r_max_rel_error"] < 1e-4
    assert summary["s_max_rel_error"] < 1e-4

    # With the recovered permutation the node turns what it receives back into plaintext.
    tok = TextTokenizer(minilm_manifest.path.parent / "tokenizer.json", 256)
    feeds = tok(["my secret medical question"])
    outputs = {}
    for manifest in (minilm_manifest, deployment_manifest):
        head = manifest.head
        outputs[manifest.encryption] = ShardSession(manifest.shard_path(head), head).run(
            {t.name: feeds[t.name] for t in head.inputs})["hidden_0"]
    received = outputs["ee-encoder/1"]
    assert report.recovered_hidden_perm is not None
    decrypted = np.empty_like(received)
    decrypted[..., report.recovered_hidden_perm] = received
    assert np.array_equal(decrypted, outputs["none"])


def test_sorted_values_recover_input_tokens_without_the_key(
        minilm_manifest: Manifest, deployment_manifest: Manifest) -> None:
    """Hidden states are only permuted: each token's sorted values give the token away."""
    from models.ee_attack import recover_tokens

    tok = TextTokenizer(minilm_manifest.path.parent / "tokenizer.json", 256)
    feeds = tok(["my secret medical question about insulin dosage",
                 "Peer-to-peer networks route requests between untrusted nodes."])
    head = deployment_manifest.head
    sent = ShardSession(deployment_manifest.shard_path(head), head).run(
        {t.name: feeds[t.name] for t in head.inputs})
    public_head = onnx.load(str(minilm_manifest.shard_path(minilm_manifest.head)))
    tokens = recover_tokens(sent["hidden_0"], sent["attention_bias"], public_head)
    real = feeds["attention_mask"] == 1
    accuracy = float(np.mean(tokens[real] == feeds["input_ids"][real]))
    print("token recovery:", json.dumps({"tokens": int(real.sum()), "accuracy": accuracy}))
    assert np.all(tokens[~real] == -1)
    assert accuracy >= 0.95
