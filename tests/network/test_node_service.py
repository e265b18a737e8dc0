"""Integration tests of a node's services other than inference, against real node processes.

Prometheus metrics, the HTTP API (/healthz, /v1/node, /v1/peers), peer exchange over
/veilnet/peers/1, /veilnet/shard/1 and shard fetch between nodes, and the process lifecycle
(SIGTERM, restart with the same identity, a readable identity key). The fixtures (``node1``,
``node2``, ``client``, ``hop``) and the shared checks live in protocol_fixtures.py.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from libp2p.abc import IHost
from node_helpers import (
    ClientThread,
    NodeProcess,
    exchange,
    metric_value,
    spawn_node,
    start_node,
    stop_process,
    wait_for,
)
from protocol_fixtures import (
    Hop,
    case_byte_count,
    case_float64,
    check_error,
    frame,
    valid_request,
)

from crypto.identity import Identity, did_from_peer_id
from models import cid_of_bytes, cid_of_file
from protocols import INFER, PEERS, SHARD
from protocols.transport import close_quietly, peer_info
from protocols.wire import encode_frame, read_frame
from registry.card import verify_card

pytest_plugins = ["protocol_fixtures"]

INFER_P = str(INFER)


# -- helpers --------------------------------------------------------------------------------------

def get_json(url: str) -> Any:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def operator(node: NodeProcess) -> dict[str, str]:
    """The headers of the node operator's calls: its API token from D/api-token."""
    return {"Authorization": "Bearer " + (node.data_dir / "api-token").read_text().strip()}


def metrics_text(node: NodeProcess) -> str:
    r = httpx.get(node.http + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


# -- HTTP API and metrics -------------------------------------------------------------------------

def test_metrics_count_requests_errors_and_latency(node1: NodeProcess, hop: Hop,
                                                   client: ClientThread) -> None:
    before = metrics_text(node1)
    sends = [(b"\x05\xff\xfe\xfd\xfc\xfb", "bad_frame"), (frame([1]), "bad_frame"),
             (encode_frame(hop.request("m1", shard=cid_of_bytes(b"nope"))), "unknown_shard"),
             (case_float64(hop), "bad_inputs"), (case_byte_count(hop), "bad_tensor"),
             (encode_frame(hop.request("m2", v=9)), "unsupported_version")]

    async def main(host: IHost) -> None:
        for payload, code in sends:
            response = await exchange(host, node1.addr, INFER, payload)
            assert response is not None and response["error"]["code"] == code
        await valid_request(host, node1, hop)
        await valid_request(host, node1, hop)

    client.run(main)

    def delta(text: str, sample: str, **labels: str) -> float:
        return metric_value(text, sample, **labels) - metric_value(before, sample, **labels)

    def observed() -> str | None:
        text = metrics_text(node1)
        return text if delta(text, "veilnet_infer_latency_seconds_count") >= 2 else None

    after = wait_for(observed, "the latency observations", 5)
    assert delta(after, "veilnet_requests_total", protocol=INFER_P) == len(sends) + 2
    for code, count in [("bad_frame", 2), ("unknown_shard", 1), ("bad_inputs", 1),
                        ("bad_tensor", 1), ("unsupported_version", 1)]:
        assert delta(after, "veilnet_errors_total", protocol=INFER_P, code=code) == count, code
    assert delta(after, "veilnet_infer_latency_seconds_count") == 2
    assert delta(after, "veilnet_infer_latency_seconds_sum") > 0
    assert metric_value(after, "veilnet_shards_served") == 2
    assert metric_value(after, "veilnet_shards_loaded") == 2


def test_healthz_and_node_info(node1: NodeProcess, hop: Hop) -> None:
    health = get_json(node1.http + "/healthz")
    assert health["status"] == "ok" and health["peer_id"] == node1.peer_id
    assert health["uptime_s"] >= 0

    info = get_json(node1.http + "/v1/node")
    assert info["peer_id"] == node1.peer_id
    assert info["did"] == node1.info["did"] == did_from_peer_id(node1.peer_id)
    assert info["multiaddrs"] == node1.info["multiaddrs"]
    assert all(a.endswith("/p2p/" + node1.peer_id) for a in info["multiaddrs"])
    assert info["http"] == node1.http
    want = sorted((s.cid, s.index) for s in hop.manifest.node_shards)
    assert sorted((s["cid"], s["index"]) for s in info["shards"]) == want
    for s in info["shards"]:
        assert s["deployment"] == hop.manifest_cid
        assert s["model"] == hop.manifest.name
        assert s["loaded"] is True  # sessions are loaded before the node says it is ready
    assert sorted(node1.info["shards"]) == sorted(c for c, _ in want)
    assert hop.head_cid not in str(info) and hop.tail_cid not in str(info)


def test_peers_are_exchanged(node1: NodeProcess, node2: NodeProcess,
                             client: ClientThread) -> None:
    def node1_knows_node2() -> list[dict[str, Any]]:
        return [r for r in get_json(node1.http + "/v1/peers") if r["peer_id"] == node2.peer_id]

    (record,) = wait_for(node1_knows_node2, "node2's hello to reach node1", 15)
    assert record["did"] == node2.info["did"]
    assert node2.addr in record["addrs"]
    assert record["http"] == node2.http

    def node2_knows_node1() -> list[dict[str, Any]]:
        return [r for r in get_json(node2.http + "/v1/peers") if r["peer_id"] == node1.peer_id]

    (back,) = wait_for(node2_knows_node1, "node1's record at node2", 15)
    assert back["did"] == node1.info["did"]
    assert sorted(back["shards"]) == sorted(node1.info["shards"])

    response = client.run(exchange, node1.addr, PEERS,
                          encode_frame({"v": 1, "id": "who", "node": None}))
    assert response is not None and response["id"] == "who"
    assert response["node"]["peer_id"] == node1.peer_id
    assert sorted(response["node"]["shards"]) == sorted(node1.info["shards"])
    assert node2.peer_id in [r["peer_id"] for r in response["peers"]]


def test_peers_record_for_another_peer_id_is_refused(node1: NodeProcess,
                                                     client: ClientThread) -> None:
    impostor = Identity.generate()
    record = {"peer_id": impostor.peer_id, "did": impostor.did, "addrs": [], "shards": []}

    assert client.identity.peer_id != impostor.peer_id
    response = client.run(exchange, node1.addr, PEERS,
                          encode_frame({"v": 1, "id": "imp", "node": record}))
    check_error(response, "bad_request", "imp")
    peers = get_json(node1.http + "/v1/peers")
    assert impostor.peer_id not in [r["peer_id"] for r in peers]


# -- shard fetch ----------------------------------------------------------------------------------

def test_shard_protocol_never_serves_client_material(node1: NodeProcess, hop: Hop,
                                                     deployment_dir: Path,
                                                     client: ClientThread) -> None:
    tokenizer_cid = hop.manifest.extra["tokenizer"]["cid"]
    key_cid = cid_of_file(deployment_dir / "client" / "key.json")

    async def main(host: IHost) -> list[dict[str, Any] | None]:
        out = []
        for cid in (hop.head_cid, hop.tail_cid, tokenizer_cid, key_cid):
            out.append(await exchange(host, node1.addr, SHARD,
                                      encode_frame({"v": 1, "id": f"get-{cid}", "cid": cid})))
        out.append(await exchange(host, node1.addr, SHARD,
                                  encode_frame({"v": 1, "id": "bad", "cid": "nope"})))
        return out

    *answers, bad = client.run(main)
    for cid, response in zip((hop.head_cid, hop.tail_cid, tokenizer_cid, key_cid), answers,
                             strict=True):
        check_error(response, "not_found", f"get-{cid}")
    check_error(bad, "bad_request", "bad")


def test_shard_protocol_serves_the_manifest(node1: NodeProcess, hop: Hop, deployment_dir: Path,
                                            client: ClientThread) -> None:
    async def main(host: IHost) -> tuple[dict[str, Any] | None, bytes]:
        info = peer_info(node1.addr)
        await host.connect(info)
        with trio.fail_after(10):
            stream = await host.new_stream(info.peer_id, [SHARD])
            try:
                await stream.write(encode_frame({"v": 1, "id": "m", "cid": hop.manifest_cid}))
                header = await read_frame(stream)
                data = b""
                while header and len(data) < header.get("size", 0):
                    chunk = await read_frame(stream)
                    assert chunk is not None
                    data += chunk["data"]
            finally:
                await close_quietly(stream)
        return header, data

    header, data = client.run(main)
    assert header is not None and header["cid"] == hop.manifest_cid and header["id"] == "m"
    assert header["size"] == len(data)
    assert data == (deployment_dir / "manifest.json").read_bytes()


def test_fetch_shards_from_a_peer(node1: NodeProcess, node2: NodeProcess, hop: Hop,
                                  client: ClientThread) -> None:
    node_cids = [s.cid for s in hop.manifest.node_shards]
    r = httpx.post(node2.http + "/v1/shards/fetch", headers=operator(node2),
                   json={"deployment": hop.manifest_cid, "peer": node1.addr}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"deployment": hop.manifest_cid, "shards": node_cids}
    # progress: one log line per shard fetched, counting shards and megabytes
    lines = [line for line in node2.log().splitlines() if f"fetch {hop.manifest_cid}:" in line]
    assert [re.search(r"shard (\d+)/(\d+) (\S+)", line).groups() for line in lines] == [
        (str(k), str(len(node_cids)), cid) for k, cid in enumerate(node_cids, 1)]

    info = get_json(node2.http + "/v1/node")
    assert sorted(s["cid"] for s in info["shards"]) == sorted(node_cids)
    assert all(s["deployment"] == hop.manifest_cid for s in info["shards"])
    files = sorted(p for p in node2.data_dir.rglob("*") if p.is_file())
    for cid in node_cids:
        path = node2.data_dir / "shards" / f"{cid}.onnx"
        assert cid_of_file(path) == cid
    assert cid_of_file(node2.data_dir / "deployments" / f"{hop.manifest_cid}.json") == \
        hop.manifest_cid
    names = {p.name for p in files}
    assert not any(c in n for n in names for c in (hop.head_cid, hop.tail_cid))
    assert not any(n.startswith(".incoming") for n in names)

    # node2 now serves the fetched shard, with its own signature
    client.run(valid_request, node2, hop)

    # and says so: its signed card, and node1's index of it, name the fetched shards
    deadline = time.monotonic() + 10
    while True:
        own = verify_card(get_json(node2.http + "/.well-known/agent-card.json"))
        seen = [verify_card(c) for c in get_json(f"{node1.http}/v1/agents?shard={node_cids[0]}")]
        if set(own.shard_cids) == set(node_cids) and node2.peer_id in {c.peer_id for c in seen}:
            break
        assert time.monotonic() < deadline, (own.shard_cids, [c.peer_id for c in seen])
        time.sleep(0.1)


def test_fetching_client_material_fails(node1: NodeProcess, node2: NodeProcess,
                                        hop: Hop) -> None:
    for body, status in (
            # client shards named as shards of the deployment: refused outright
            ({"deployment": hop.manifest_cid, "shards": [hop.head_cid], "peer": node1.addr}, 400),
            ({"deployment": hop.manifest_cid, "shards": [hop.tail_cid], "peer": node1.addr}, 400),
            # the head shard asked for as if it were a manifest: node1 does not serve it
            ({"deployment": hop.head_cid, "peer": node1.addr}, 502)):
        r = httpx.post(node2.http + "/v1/shards/fetch", json=body, headers=operator(node2),
                       timeout=60)
        assert r.status_code == status, (body, r.status_code, r.text)
    for cid in (hop.head_cid, hop.tail_cid):
        assert not (node2.data_dir / "shards" / f"{cid}.onnx").exists()
        assert not (node2.data_dir / "deployments" / f"{cid}.json").exists()
    r = httpx.post(node2.http + "/v1/shards/fetch", headers=operator(node2),
                   json={"deployment": "not-a-cid", "peer": node1.addr}, timeout=30)
    assert r.status_code == 400


# -- lifecycle ------------------------------------------------------------------------------------

def test_sigterm_stops_cleanly_and_identity_is_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "D"
    first = start_node(data_dir)
    try:
        key = data_dir / "identity.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert first.info["identity_created"] is True
        key_bytes = key.read_bytes()
        token = data_dir / "api-token"  # the operator's token for POST /v1/shards/fetch
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        token_text = token.read_text()
        assert len(token_text.strip()) >= 32
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        code = first.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        stop_process(first.proc)
    assert code == 0, first.log()
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert not (data_dir / "node.json").exists()
    assert "node stopped" in first.log()

    second = start_node(data_dir)
    try:
        assert second.peer_id == first.peer_id
        assert second.info["did"] == first.info["did"]
        assert second.info["identity_created"] is False
        assert key.read_bytes() == key_bytes
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert token.read_text() == token_text
        assert second.stop() == 0
    finally:
        stop_process(second.proc)
    assert not (data_dir / "node.json").exists()


def test_node_refuses_a_readable_identity_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "D"
    data_dir.mkdir()
    Identity.generate().save(data_dir / "identity.key")
    os.chmod(data_dir / "identity.key", 0o644)
    proc, log_path = spawn_node(data_dir)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise
    log = log_path.read_text()
    assert code == 2, log
    assert "chmod 600" in log
    assert not (data_dir / "node.json").exists()
