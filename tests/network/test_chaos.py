"""The chaos soak (scripts/chaos.py) for one minute: six real nodes, three clients with ledger
receipts, and a seeded schedule that kills, freezes, corrupts, restarts the ledger and makes a
node lie. Nothing may be wrong, lost or left behind, and no query may fail while two honest
holders of every shard are up (the schedule keeps them so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_one_minute_of_chaos_loses_nothing(tmp_path: Path, deployment_dir: Path,
                                           minilm_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--minutes", "1", "--seed", "1",
         "--json", "--dir", str(tmp_path / "T"), "--deployment", str(deployment_dir),
         "--model", str(minilm_dir)],
        capture_output=True, text=True, timeout=600)
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    print(json.dumps({k: report[k] for k in ("queries", "receipts", "witness_refusals")}))
    # the schedule (seed 1) disturbs nodes in every way the soak knows
    assert {e["kind"] for e in report["events"] if e["began_s"] is not None} == {
        "kill", "freeze", "ledger", "corrupt", "byzantine"}
    assert not any("failed" in e.get("note", "") for e in report["events"]), report["events"]
    queries = report["queries"]
    assert queries["issued"] >= 30, queries
    assert queries["wrong_answers"] == 0, queries
    assert queries["failed_while_covered"] == 0, queries["failure_reasons"]
    receipts = report["receipts"]
    assert receipts["acknowledged"] >= 20, receipts
    assert receipts["missing_from_ledger"] == 0, receipts
    assert report["ledger_verify"]["ok"], report["ledger_verify"]
    assert report["processes_left"] == 0
    assert report["targets_met"] and done.returncode == 0
