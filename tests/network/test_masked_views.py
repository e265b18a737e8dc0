"""``veilnet audit DEPLOY --views DIR ...`` on what real masked/1 nodes recorded: a testnet of
three nodes (every node shard on all three, ``--record-received`` on each, one directory per
node), one query of a few sentences through ``client.Client``, then the audit as a subprocess
attacks each node's recording alone and every pair pooled (models/audit_views.py,
docs/threat-model.md, "masked/1")."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_helpers import veilnet_in_process
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["A man is eating food.", "Masked offload hides every activation from one node.",
         "The quick brown fox jumps over the lazy dog near the riverbank."]


@pytest.fixture(scope="module")
def recorded(masked_deployment: Path, minilm_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """Three nodes, each recording what it receives into its own directory; one query."""
    sys.path.insert(0, str(REPO / "scripts"))
    from localnet import Testnet

    from client import Client

    with Testnet(tmp_path_factory.mktemp("masked-views") / "T", nodes=3, replicas=3,
                 deployment=masked_deployment, model=minilm_dir,
                 node_args=["--threads", "1", "--announce-interval", "2"],
                 # each node records into its own directory
                 args_for=lambda node: ["--record-received", str(node.data_dir / "received")],
                 log=lambda _: None) as net:
        with Client([net.bootstrap], masked_deployment, ledger=False, seed=5) as client:
            result = client.embed(TEXTS)
        assert result.embeddings.shape == (len(TEXTS), 384)
        yield [n.data_dir / "received" for n in net.nodes]


def _audit(deploy: Path, model: Path, dirs: list[Path]) -> dict[str, Any]:
    args = [a for d in dirs for a in ("--views", str(d))]
    proc = subprocess.run([sys.executable, "-m", "node", "audit", str(deploy), "--model",
                           str(model), *args, "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_one_node_reads_nothing_and_a_colluding_pair_reads_everything(
        recorded: list[Path], masked_deployment: Path, minilm_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    tok = Tokenizer.from_file(str(masked_deployment / "client" / "tokenizer.json"))
    real = sum(1 for t in TEXTS for s in tok.encode(t).special_tokens_mask if not s)
    have = [d for d in recorded if (d / "index.jsonl").is_file()]
    assert len(have) >= 2  # an A and a B for every call, of different nodes
    doc = _audit(masked_deployment, minilm_dir, recorded)
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1))
    rows = {r["attack"]: r for r in doc["rows"]}
    for r in doc["rows"]:
        print(f"{r['attack']:50} {r['success']:.4f} {r['baseline']:.4f} {r['detail']['tokens']}")
    assert all(r["source"] == "views" for r in doc["rows"])
    # every layer-0 call was paired, and the owner's reading counts exactly the real tokens
    assert doc["views"]["ground_truth"] == {"requests": 1, "tokens": real}
    assert doc["views"]["unpaired"] == 0 and doc["views"]["paired"] == 24
    assert doc["bound"]["bits_per_token_per_query"] == 1e-4
    alone = [r for r in doc["rows"] if not r["attack"].startswith("collusion")]
    assert alone, doc["views"]
    for r in alone:  # each node alone: at most the best constant guess (+ 1 point)
        assert r["success"] <= r["baseline"] + 0.01, r
    colluding = [r for r in doc["rows"] if r["attack"].startswith("collusion")]
    assert colluding and all(r["success"] >= 0.95 for r in colluding)  # measured 1.0
    assert all(r["detail"]["tokens"] == real for r in colluding)
    assert any(r["detail"]["activations_recovered"] >= 1 for r in colluding)
    # views of one node alone: no pair, so nothing scored, and the report says why (the same
    # command, node.cli.main, called in this process: it stops before any attack, so a Python
    # start-up and the imports would be most of its time)
    done = veilnet_in_process(capsys, "audit", str(masked_deployment), "--model",
                              str(minilm_dir), "--views", str(have[0]), "--json")
    assert done.returncode == 0, done.stderr
    lone = json.loads(done.stdout)
    assert lone["rows"] == [] and lone["views"]["unscored"]
    assert "nearest embedding (ML) [views 1]" in rows or "nearest embedding (ML) [views 2]" \
        in rows
