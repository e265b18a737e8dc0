"""``veilnet audit DEPLOY --views DIR ...`` on what real nodes recorded of a SmolLM2 generation
(ee-decoder/1): a local testnet (scripts/localnet.py) of three nodes, one node shard each, every
node started with ``--record-received`` into its own directory; the client SDK generates through
them (each node shard a session: the prompt's ``open``, then one ``step`` per token); then the
audit, as a subprocess given every node's recording, attacks exactly those recorded views
(models/audit_views_decoder.py; docs/threat-model.md, "Auditing a deployment")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client import Client
from models import Manifest
from models.audit_report import special_ids

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import NodeInfo, Testnet  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 8


def recording(node: NodeInfo) -> Path:
    return node.data_dir / "received"


def test_audit_attacks_the_recorded_generation(smollm2_deployment: Path, smollm2_dir: Path,
                                               tmp_path: Path) -> None:
    with Testnet(tmp_path / "net", nodes=3, replicas=1, deployment=smollm2_deployment,
                 model=smollm2_dir, node_args=["--threads", "1", "--record-max-mb", "64"],
                 ledger_nodes=(), timeout=120,
                 args_for=lambda node: ["--record-received", str(recording(node))]) as net, \
            Client([net.bootstrap], smollm2_deployment, verify="none", ledger=False,
                   timeout=60) as client:
        result = client.generate(messages=MESSAGES, max_tokens=TOKENS)
        dirs = [recording(n) for n in net.nodes if n.shards]
    assert len(result.token_ids) == TOKENS
    views = [a for d in dirs for a in ("--views", str(d))]
    proc = subprocess.run(
        [sys.executable, "-m", "node", "audit", str(smollm2_deployment), "--model",
         str(smollm2_dir), *views, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["rows"] and all(r["source"] == "views" for r in doc["rows"])
    rows = {(r["attack"], r["target"]): r for r in doc["rows"]}
    assert rows[("exact weight matching", "rotation")]["success"] == 1.0
    # the first node shard received the prompt, then every generated token but the last
    special = special_ids(smollm2_deployment / "client" / "tokenizer.json")
    fed = [i for i in [*result.prompt_token_ids, *result.token_ids[:-1]] if i not in special]
    for attack in ("exact weight matching", "keyless norms", "keyless traffic rotation"):
        row = rows[(attack, "input tokens")]
        print(attack, row["success"], row["baseline"], row["detail"]["tokens"])
        assert row["success"] >= 0.99, attack  # measured 1.0 for all three
        assert row["detail"]["tokens"] == len(fed)
        assert row["detail"]["views"] == TOKENS  # one open and TOKENS - 1 steps
    shards = Manifest.load(smollm2_deployment).node_shards
    assert doc["views"]["dirs"] == [str(d) for d in dirs]
    assert doc["views"]["attacked"]["shard"] == shards[0].cid
    # every later view, recorded by another node, is linked to the owner's replay of the first
    # shard's session
    assert [(s["index"], s["views"], s["linked"]) for s in doc["views"]["linked"]] == [
        (s.index, TOKENS, TOKENS) for s in shards[1:]]
    assert doc["views"]["unscored"] == []
    for shard in shards[1:]:
        name = next(t.name for t in shard.inputs if not t.name.startswith("past_"))
        row = rows[(f"decrypt-then-probe [{name}]", "input tokens")]
        print(name, row["success"], row["baseline"], row["detail"]["coverage"])
        assert row["detail"]["tokens"] == len(fed) and 0 < row["detail"]["coverage"] <= 1
