"""The ledger across real node processes: receipts of testnet queries, the HTTP read side, and
witnesses refusing a forked log over /veilnet/witness/1."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from node_helpers import (
    ClientThread,
    NodeProcess,
    metric_value,
    start_node,
    stop_at_teardown,
    veilnet_in_process,
)

from crypto.identity import Identity, public_from_did, verify
from ledger.checkpoint import parse_checkpoint
from ledger.entries import parse_entry
from ledger.log import Log
from ledger.merkle import leaf_hash, verify_consistency
from ledger.note import parse_note, parse_verifier_key, verify_note
from ledger.tlog_proof import parse_proof, verify_proof
from protocols import LEDGER, WITNESS
from protocols.infer import receipt_payload
from protocols.transport import RemoteError, connect, peer_info, request
from protocols.wire import WIRE_VERSION
from registry.card import build_card, verify_card

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, deployment_dir: Path,
        minilm_dir: Path) -> Iterator[Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    from localnet import Testnet

    with Testnet(tmp_path_factory.mktemp("ledgernet") / "T", nodes=3, replicas=2,
                 deployment=deployment_dir, model=minilm_dir, node_args=["--threads", "1"],
                 ledger_nodes=[0], log=lambda _: None) as testnet:
        yield testnet


def test_query_receipts_verify_offline_with_a_witness_quorum(
        net: Any, minilm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client import Client
    from models import Manifest, Pipeline

    ledger_http = net.nodes[0].http
    log_key = httpx.get(f"{ledger_http}/ledger/key", timeout=5).text.strip()
    cards = [verify_card(c) for c in httpx.get(f"{ledger_http}/v1/agents", timeout=5).json()]
    assert {c.peer_id for c in cards if c.ledger_key} == {net.nodes[0].peer_id}
    assert [c.ledger_key for c in cards if c.ledger_key] == [log_key]
    witness_keys = [c.witness_key for c in cards
                    if c.witness_key and c.peer_id != net.nodes[0].peer_id]
    assert len(witness_keys) == 2

    texts = ["a receipt for this query", "logged and witnessed"]
    receipts = []
    with Client([net.bootstrap], net.deployment, ledger=True, witness_quorum=2) as client:
        for _ in range(3):
            result = client.embed(texts)
            assert result.receipt is not None, result.receipt_error
            receipts.append((result, result.receipt))
    reference = Pipeline(minilm_dir).embed(texts)
    indexes = [r.index for _, r in receipts]
    assert indexes == sorted(set(indexes))

    log_verifier = parse_verifier_key(log_key)
    witnesses = [parse_verifier_key(k) for k in witness_keys]
    for result, receipt in receipts:
        assert np.abs(result.embeddings - reference).max() <= 1e-4
        # offline: nothing but the proof text, the entry, the log key and the witness keys
        checkpoint = verify_proof(receipt.proof, receipt.entry, log_verifier, witnesses, 2)
        assert parse_proof(receipt.proof).index == receipt.index < checkpoint.size
        with pytest.raises(ValueError):
            verify_proof(receipt.proof, receipt.entry + b"x", log_verifier, witnesses, 2)
        # the entry names every hop, each with the node's own signature over its digests
        entry = parse_entry(receipt.entry)
        assert entry.type == "infer-receipt/1"
        assert entry.body["verdict"] == "accepted"  # every hop won a verdict of 2 nodes
        assert entry.body["deployment"] == Manifest.load(net.deployment).cid
        assert [h["node"] for h in entry.body["hops"]] == [h.node_did for h in result.hops]
        for hop in entry.body["hops"]:
            assert verify(public_from_did(hop["node"]), hop["signature"], receipt_payload(
                hop["id"], hop["shard"], hop["input_digest"], hop["output_digest"]))

    # a receipt never claims checks that did not happen: one node per hop is "unverified"
    with Client([net.bootstrap], net.deployment, ledger=True, verify="none") as client:
        single = client.embed(texts)
    assert single.receipt is not None, single.receipt_error
    assert parse_entry(single.receipt.entry).body["verdict"] == "unverified"

    # offline from the command line too: `veilnet ledger check-proof --receipt FILE` (once as
    # a process; the other cases call what the command runs, node.cli.main, in this process,
    # which saves a Python start-up and the imports each)
    good = tmp_path / "receipt.json"
    good.write_text(json.dumps({"receipt": receipts[0][1].to_json()}))
    ok = check_proof("--receipt", str(good))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    forged = tmp_path / "forged.json"
    doc = receipts[0][1].to_json()
    flipped = bytes.fromhex(doc["entry"])[:-1] + bytes([bytes.fromhex(doc["entry"])[-1] ^ 1])
    forged.write_text(json.dumps({**doc, "entry": flipped.hex()}))
    bad = veilnet_in_process(capsys, "ledger", "check-proof", "--receipt", str(forged))
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
    short_quorum = veilnet_in_process(capsys, "ledger", "check-proof", "--receipt", str(good),
                                      "--quorum", "3")
    assert short_quorum.returncode == 1, short_quorum.stdout
    assert veilnet_in_process(capsys, "ledger", "check-proof", "--receipt",
                              str(tmp_path / "missing.json")).returncode == 2

    # the HTTP read side agrees with the receipts
    last = receipts[-1][1]
    proof = httpx.get(f"{ledger_http}/ledger/proof", params={"index": last.index},
                      timeout=5).text
    assert verify_proof(proof, last.entry, log_verifier).size >= last.index + 1
    note = httpx.get(f"{ledger_http}/ledger/checkpoint", timeout=5).text
    latest = parse_checkpoint(verify_note(note, [log_verifier])[0].text)
    first = parse_checkpoint(parse_note(parse_proof(receipts[0][1].proof).checkpoint_note).text)
    hashes = httpx.get(f"{ledger_http}/ledger/consistency",
                       params={"old": first.size, "new": latest.size}, timeout=5).text.split()
    verify_consistency(first.size, latest.size, first.root, latest.root,
                       [base64.b64decode(h) for h in hashes])
    rows = httpx.get(f"{ledger_http}/ledger/entries", params={"from": 0}, timeout=5).json()
    by_index = {r["index"]: base64.b64decode(r["data"]) for r in rows}
    for _, receipt in receipts:
        assert leaf_hash(by_index[receipt.index]) == receipt.leaf_hash
    assert httpx.get(f"{ledger_http}/ledger/proof", params={"index": 10**6},
                     timeout=5).status_code == 400
    metrics = httpx.get(f"{ledger_http}/metrics", timeout=5).text
    assert metric_value(metrics, "veilnet_ledger_size") >= len(receipts)
    # a node without --ledger says so
    other = net.nodes[1].http
    assert httpx.get(f"{other}/ledger/checkpoint", timeout=5).status_code == 404


def check_proof(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "ledger", "check-proof", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


# -- a witness shown a fork ------------------------------------------------------------------

@pytest.fixture(scope="module")
def witness_node(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    return stop_at_teardown(request, start_node(tmp_path_factory.mktemp("witness") / "D"))


def offer(peer: ClientThread, node: NodeProcess, note: str, old: int,
          proof: list[bytes]) -> dict[str, Any]:
    async def go(host: Any) -> dict[str, Any]:
        info = peer_info(node.addr)
        await connect(host, info, 10)
        return await request(host, info.peer_id, WITNESS, {
            "v": WIRE_VERSION, "id": secrets.token_hex(8), "note": note, "old": old,
            "proof": proof}, 15)

    return peer.run(go)


def test_witness_node_cosigns_then_refuses_a_fork(witness_node: NodeProcess,
                                                  tmp_path: Path) -> None:
    log = Log.init(tmp_path / "honest", "example.org/forking-log")
    log.append([b"e0", b"e1", b"e2"])
    log.close()
    shutil.copytree(tmp_path / "honest", tmp_path / "fork")  # the same key: it can fork
    honest, fork = Log.open(tmp_path / "honest"), Log.open(tmp_path / "fork")
    honest.append([b"e3"])
    fork.append([b"X3"])

    peer = ClientThread(Identity.generate()).start()
    try:
        # before the log's card is known, the witness does not know the log
        answer = offer(peer, witness_node, honest.checkpoint(3), 0, [])
        assert answer["refused"]["reason"] == "unknown-log"
        card = build_card(peer.identity, a2a_url="http://127.0.0.1:9/a2a",
                          multiaddrs=["/ip4/127.0.0.1/tcp/9"], shards=[],
                          ledger_key=honest.verifier_key, ttl=300)
        posted = httpx.post(f"{witness_node.http}/v1/agents", json=card, timeout=5)
        assert posted.status_code == 201, posted.text

        answer = offer(peer, witness_node, honest.checkpoint(3), 0, honest.consistency(0, 3))
        line = answer["cosignature"]
        witness_key = verify_card(httpx.get(f"{witness_node.http}/.well-known/agent-card.json",
                                            timeout=5).json()).witness_key
        assert witness_key is not None
        cosigned = honest.checkpoint(3, cosigned=False) + line
        _, signers = verify_note(cosigned, [honest.verifier, parse_verifier_key(witness_key)])
        assert len(signers) == 2
        answer = offer(peer, witness_node, honest.checkpoint(4), 3, honest.consistency(3, 4))
        assert "cosignature" in answer

        # an oversized note is refused before it is parsed
        with pytest.raises(RemoteError, match="at most 65536 characters"):
            offer(peer, witness_node, honest.checkpoint(4) + "x" * 70_000, 3, [])

        # the fork: the same size with another root, then a size that does not extend size 4
        answer = offer(peer, witness_node, fork.checkpoint(4), 4, [])
        assert answer["refused"]["reason"] == "fork"
        fork.append([b"X4"])
        answer = offer(peer, witness_node, fork.checkpoint(5), 4, fork.consistency(4, 5))
        assert answer["refused"]["reason"] == "inconsistent"
        answer = offer(peer, witness_node, fork.checkpoint(5), 3, fork.consistency(3, 5))
        assert answer["refused"] == {"reason": "conflict", "size": 4,
                                     "message": answer["refused"]["message"]}
    finally:
        peer.close()
    metrics = httpx.get(f"{witness_node.http}/metrics", timeout=5).text
    for reason in ("fork", "inconsistent", "conflict", "unknown-log"):
        assert metric_value(metrics, "veilnet_witness_refused_total", reason=reason) >= 1
    assert metric_value(metrics, "veilnet_witness_cosigned_total") >= 2
    assert "witness: refused a checkpoint" in witness_node.log()
    assert httpx.get(f"{witness_node.http}/healthz", timeout=5).status_code == 200


def test_ledger_node_logs_only_signed_entries(net: Any) -> None:
    from ledger.entries import make_entry

    peer = ClientThread().start()
    try:
        async def append(host: Any, entry: bytes) -> dict[str, Any]:
            info = peer_info(net.nodes[0].multiaddrs[0])
            await connect(host, info, 10)
            try:
                return await request(host, info.peer_id, LEDGER, {
                    "v": WIRE_VERSION, "id": secrets.token_hex(8), "op": "append",
                    "entry": entry}, 15)
            except RemoteError as exc:
                return {"error": exc.code, "message": exc.message}

        good = make_entry(peer.identity, "node-join/1", {"node": peer.identity.did})
        answer = peer.run(append, good)
        assert isinstance(answer["index"], int) and answer["leaf_hash"] == leaf_hash(good)
        for bad in (b"raw bytes", good[:-1] + bytes([good[-1] ^ 1])):
            answer = peer.run(append, bad)
            assert answer["error"] == "bad_request" and "not a veilnet ledger entry" in \
                answer["message"]
    finally:
        peer.close()
