"""The ledger under real subprocesses: a SIGKILLed appender loses no acknowledged entry, and
the ``veilnet ledger`` command line round trip (moved from tests/unit/ledger/test_ledger_log.py;
three of its calls as subprocesses, the rest in-process through the same ``main``)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from node_helpers import CommandResult, veilnet_in_process

from ledger.log import Log
from ledger.merkle import leaf_hash, root_of, verify_consistency
from ledger.note import parse_verifier_key
from ledger.tlog_proof import verify_proof

REPO = Path(__file__).resolve().parents[2]


def new_log(tmp_path: Path, name: str = "L", origin: str = "example.org/test-log") -> Log:
    return Log.init(tmp_path / name, origin)


APPENDER = """
import sys
from ledger.log import Log
log = Log.open(sys.argv[1])
i = log.size
while True:
    batch = [f"entry {j}".encode() for j in range(i, i + 1 + i % 7)]
    results, note = log.append(batch)
    i += len(batch)
    print(results[-1][0], flush=True)   # acknowledged: committed with its checkpoint
"""


def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.append([b"entry 0"])
    notes_before = {size: note for size, _, note in log.store.checkpoints()}
    log.close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path / "L")],
                            stdout=subprocess.PIPE, text=True, env=env)
    acked = -1
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while acked < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    assert acked >= 400, "the appender did not get far enough"
    log = Log.open(tmp_path / "L")
    assert log.size >= acked + 1
    for index, data in log.store.entries(0, acked + 1):
        assert data == f"entry {index}".encode()
    report = log.verify()
    assert report.ok, report.problems
    # the log after the crash is consistent with every checkpoint seen before and during it
    latest_size, latest_root, _ = log.store.checkpoint()
    for size, root, _note in log.store.checkpoints():
        verify_consistency(size, latest_size, root, latest_root,
                           log.consistency(size, latest_size))
    for size, note in notes_before.items():
        assert log.checkpoint(size, cosigned=False) == note


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``veilnet ledger`` init, append, key, proof, consistency, verify and two refusals. The
    calls marked ``process=True`` run ``python -m node ledger`` as a subprocess (the entry point,
    stdin piped in, the exit status); the others call the function that command runs
    (``node.cli.main``) in this process with the same arguments and stdin, which checks the
    same output and exit codes without a Python start-up each."""
    def veilnet(*args: str, stdin: bytes = b"", process: bool = False) -> CommandResult:
        if process:
            done = subprocess.run([sys.executable, "-m", "node", "ledger", *args], input=stdin,
                                  capture_output=True, cwd=REPO, timeout=60)
            return CommandResult(done.returncode, done.stdout.decode(), done.stderr.decode())
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        return veilnet_in_process(capsys, "ledger", *args)

    d = str(tmp_path / "cli")
    init = veilnet("init", d, "--origin", "example.org/cli", process=True)
    assert init.returncode == 0, init.stderr
    key = json.loads(init.stdout)["key"]
    for i in range(3):
        out = json.loads(veilnet("append", d, "-", stdin=f"e{i}".encode(), process=i == 0).stdout)
        assert out["index"] == i
        assert base64.b64decode(out["leaf_hash"]) == leaf_hash(f"e{i}".encode())
    assert veilnet("key", d).stdout.strip() == key
    proof = veilnet("proof", d, "--index", "1").stdout
    assert verify_proof(proof, b"e1", parse_verifier_key(key)).size == 3
    hashes = veilnet("consistency", d, "--old", "1").stdout.split()
    verify_consistency(1, 3, root_of([leaf_hash(b"e0")]),
                       root_of([leaf_hash(f"e{i}".encode()) for i in range(3)]),
                       [base64.b64decode(h) for h in hashes])
    assert json.loads(veilnet("verify", d).stdout)["ok"] is True
    bad = veilnet("proof", d, "--index", "9", process=True)
    assert bad.returncode == 2 and "index 9" in bad.stderr
    missing = veilnet("checkpoint", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no ledger" in missing.stderr
