"""``veilnet audit DEPLOY --views DIR`` on what a real node recorded: a MiniLM query through a
node started with ``--record-received``, then the audit as a subprocess attacks exactly those
recorded tensors (models/audit_views.py; docs/threat-model.md, "Auditing a deployment")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from node_helpers import REPO, serving_node

from client import Client
from models import Manifest

TEXTS = ["A man is eating food.", "The node recorded exactly what it was sent."]


def test_audit_attacks_the_recorded_views(request: pytest.FixtureRequest, deployment_dir: Path,
                                          minilm_dir: Path, tmp_path: Path) -> None:
    rec = tmp_path / "received"
    node = serving_node(request, tmp_path / "D", deployment_dir, "--record-received", str(rec),
                        "--record-max-mb", "64", "--request-timeout", "20")
    with Client([node.addr], deployment_dir, verify="none", ledger=False,
                spot_rate=0.0) as client:
        client.embed(TEXTS)
    proc = subprocess.run(
        [sys.executable, "-m", "node", "audit", str(deployment_dir), "--model", str(minilm_dir),
         "--views", str(rec), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {(r["attack"], r["target"]): r for r in doc["rows"]}
    assert all(r["source"] == "views" for r in doc["rows"])
    for attack in ("keyless sort", "exact weight matching"):
        row = rows[(attack, "input tokens")]
        assert row["success"] >= 0.99  # measured 1.0
        assert row["detail"]["tokens"] > 10 and row["detail"]["requests"] == 1
    shards = Manifest.load(deployment_dir).node_shards
    assert [(s["shard"], s["views"]) for s in doc["views"]["shards"]] == [
        (s.cid, 1) for s in shards]
    # the later shard's view continues the first: linked, scored, read by decrypt-then-probe
    later = [r for r in doc["rows"] if r["attack"].startswith("decrypt-then-probe")]
    assert [r["detail"]["shard"] for r in later] == [s.index for s in shards[1:]]
    assert all(r["detail"]["tokens"] == rows[("exact weight matching", "input tokens")][
        "detail"]["tokens"] and r["success"] >= r["baseline"] for r in later)
    assert doc["views"]["unscored"] == []
