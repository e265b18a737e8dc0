"""Issue 12, items 4 and 7 (node side): shard downloads are bounded, the fetch route needs the
operator's token, and a shard file that does not match its CID is never served.

Attacks run against real ``veilnet node start`` processes. The malicious peer is a real
py-libp2p host (``ClientThread``) serving ``/veilnet/shard/1`` the way a hostile node would: it
declares a 1 TiB shard and then streams chunks for as long as it is read, or sends garbage of the
right size. Node memory is read from /proc/<pid>/status (VmHWM: the peak resident set).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from libp2p.abc import IHost, INetStream
from node_helpers import (
    ClientThread,
    NodeProcess,
    exchange,
    metric_value,
    start_node,
    stop_at_teardown,
)
from node_helpers import veilnet_in_process as veilnet
from protocol_fixtures import Hop, check_error, valid_request

from models import Manifest, cid_of_bytes, cid_of_file
from node.store import MANIFEST_LIMIT, ShardStore
from protocols import INFER, SHARD
from protocols.transport import close_quietly, full_addrs
from protocols.wire import encode_frame, read_frame, write_frame
from registry.card import verify_card

pytest_plugins = ["protocol_fixtures"]

TIB = 1 << 40
CHUNK = 1 << 20

Behaviour = Callable[[INetStream, dict[str, Any]], Awaitable[None]]


# -- helpers --------------------------------------------------------------------------------------

def status_kib(pid: int, field: str) -> int:
    """A figure from /proc/<pid>/status in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def token_headers(node: NodeProcess) -> dict[str, str]:
    return {"Authorization": "Bearer " + (node.data_dir / "api-token").read_text().strip()}


def fetch(node: NodeProcess, body: dict[str, Any], headers: dict[str, str] | None = None,
          timeout: float = 90) -> httpx.Response:
    return httpx.post(node.http + "/v1/shards/fetch", json=body,
                      headers=token_headers(node) if headers is None else headers,
                      timeout=timeout)


def leftovers(data_dir: Path) -> list[str]:
    return [p.name for p in data_dir.rglob(".incoming-*")]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the weights: same size, loads fine, wrong answers
    path.write_bytes(bytes(data))


class ShardServer:
    """The hostile side of /veilnet/shard/1: ``behaviours`` maps a requested CID to what the
    peer does with the stream; it records every request it sees."""

    def __init__(self) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[str] = []
        self.chunks_sent = 0

    @contextlib.asynccontextmanager
    async def serve(self, host: IHost) -> AsyncIterator[ShardServer]:
        host.set_stream_handler(SHARD, self._handle)
        yield self

    async def _handle(self, stream: INetStream) -> None:
        try:
            request = await read_frame(stream)
            assert request is not None
            self.requests.append(request["cid"])
            behaviour = self.behaviours.get(request["cid"], not_found)
            with trio.move_on_after(60):
                await behaviour(stream, request)
        except Exception:
            pass  # the node hung up on us: that is the point
        finally:
            await close_quietly(stream)

    def honest(self, data: bytes) -> Behaviour:
        async def send(stream: INetStream, request: dict[str, Any]) -> None:
            await write_frame(stream, {"v": 1, "id": request["id"], "cid": request["cid"],
                                       "size": len(data)})
            for offset in range(0, len(data), CHUNK):
                await write_frame(stream, {"data": data[offset:offset + CHUNK]})
        return send

    def endless(self, size: int = TIB, limit: int = 2048) -> Behaviour:
        """Declare ``size`` bytes, then send 1 MiB chunks until the node stops reading (or
        ``limit`` chunks: 2 GiB, enough to push an unbounded node past any sane RSS)."""
        async def send(stream: INetStream, request: dict[str, Any]) -> None:
            await write_frame(stream, {"v": 1, "id": request["id"], "cid": request["cid"],
                                       "size": size})
            block = bytes(CHUNK)
            for _ in range(limit):
                await write_frame(stream, {"data": block})
                self.chunks_sent += 1
        return send


async def not_found(stream: INetStream, request: dict[str, Any]) -> None:
    await write_frame(stream, {"v": 1, "id": request["id"],
                               "error": {"code": "not_found", "message": "no"}})


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def victim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ) -> NodeProcess:
    """An empty node that is told to fetch from the hostile peer."""
    return stop_at_teardown(request, start_node(tmp_path_factory.mktemp("victim") / "D"))


@pytest.fixture(scope="module")
def hostile() -> Iterator[ClientThread]:
    server = ShardServer()
    thread = ClientThread(services=server.serve).start()
    yield thread
    thread.close()


def hostile_addr(thread: ClientThread) -> str:
    assert thread.host is not None
    return full_addrs(thread.host)[0]


def old_style(manifest_bytes: bytes) -> bytes:
    """The same deployment as a manifest written before shards had a 'size'."""
    doc = json.loads(manifest_bytes)
    for shard in doc["shards"]:
        del shard["size"]
    return Manifest.from_json(doc).dumps()


# -- item 4: bounded downloads --------------------------------------------------------------------

def test_a_peer_declaring_a_huge_shard_cannot_make_a_node_buffer(
        victim: NodeProcess, hostile: ClientThread, deployment_dir: Path) -> None:
    server: ShardServer = hostile.extra
    manifest_bytes = (deployment_dir / "manifest.json").read_bytes()
    manifest = Manifest.from_json_bytes(manifest_bytes)
    deployment = cid_of_bytes(manifest_bytes)
    shard = manifest.node_shards[0]
    assert shard.size == (deployment_dir / shard.path).stat().st_size  # the manifest says so
    server.behaviours[deployment] = server.honest(manifest_bytes)
    server.behaviours[shard.cid] = server.endless()
    pid = victim.proc.pid
    peak_before = status_kib(pid, "VmHWM")

    started = time.monotonic()
    r = fetch(victim, {"deployment": deployment, "shards": [shard.cid],
                       "peer": hostile_addr(hostile)})
    elapsed = time.monotonic() - started

    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert f"as {TIB} bytes" in detail and shard.cid in detail, detail
    assert f"the size its manifest declares is {shard.size} bytes" in detail, detail
    assert elapsed < 30, f"took {elapsed:.1f} s to refuse"  # refused at the header
    growth_mib = (status_kib(pid, "VmHWM") - peak_before) / 1024
    assert growth_mib < 100, f"node peak RSS grew {growth_mib:.0f} MiB"
    assert server.chunks_sent < 64  # what fits the stream's window before the node hung up
    assert not (victim.data_dir / "shards" / f"{shard.cid}.onnx").exists()
    assert leftovers(victim.data_dir) == []
    assert httpx.get(victim.http + "/healthz", timeout=10).status_code == 200


def test_old_manifests_are_capped_by_the_node_limit(victim: NodeProcess, hostile: ClientThread,
                                                    deployment_dir: Path) -> None:
    server: ShardServer = hostile.extra
    data = old_style((deployment_dir / "manifest.json").read_bytes())
    deployment = cid_of_bytes(data)
    shard = Manifest.from_json_bytes(data).node_shards[1]
    assert shard.size is None
    server.behaviours[deployment] = server.honest(data)
    server.behaviours[shard.cid] = server.endless()

    r = fetch(victim, {"deployment": deployment, "shards": [shard.cid],
                       "peer": hostile_addr(hostile)})
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert f"as {TIB} bytes" in detail and "shard_size_limit" in detail, detail
    assert str(1 << 30) in detail, detail  # the default limit, 1 GiB
    assert not (victim.data_dir / "shards" / f"{shard.cid}.onnx").exists()
    assert leftovers(victim.data_dir) == []


def test_a_manifest_download_is_capped(victim: NodeProcess, hostile: ClientThread) -> None:
    server: ShardServer = hostile.extra
    fake = cid_of_bytes(b"a manifest this peer claims is huge")
    server.behaviours[fake] = server.endless()
    r = fetch(victim, {"deployment": fake, "peer": hostile_addr(hostile)})
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert f"as {TIB} bytes" in detail and f"limit for a manifest is {MANIFEST_LIMIT}" in detail
    assert not (victim.data_dir / "deployments" / f"{fake}.json").exists()


def test_garbage_of_the_declared_size_goes_to_disk_and_is_dropped(
        victim: NodeProcess, hostile: ClientThread, deployment_dir: Path) -> None:
    server: ShardServer = hostile.extra
    manifest_bytes = (deployment_dir / "manifest.json").read_bytes()
    shard = Manifest.from_json_bytes(manifest_bytes).node_shards[1]
    assert shard.size is not None
    server.behaviours[cid_of_bytes(manifest_bytes)] = server.honest(manifest_bytes)
    server.behaviours[shard.cid] = server.honest(bytes(shard.size))
    r = fetch(victim, {"deployment": cid_of_bytes(manifest_bytes), "shards": [shard.cid],
                       "peer": hostile_addr(hostile)})
    assert r.status_code == 502, r.text
    assert f"does not match CID {shard.cid}" in r.json()["detail"]
    assert not (victim.data_dir / "shards" / f"{shard.cid}.onnx").exists()
    assert leftovers(victim.data_dir) == []


def test_fetch_needs_the_operator_token_and_dials_nothing_without_it(
        victim: NodeProcess) -> None:
    bait_server = ShardServer()
    bait = ClientThread(services=bait_server.serve).start()
    try:
        deployment = cid_of_bytes(b"a deployment only the bait would be asked for")
        body = {"deployment": deployment, "peer": hostile_addr(bait)}
        token = token_headers(victim)["Authorization"].removeprefix("Bearer ")
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Bearer " + token[:-1]},
                        {"Authorization": "Basic " + token}, {"Authorization": token}):
            r = fetch(victim, body, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "token" in r.json()["detail"]
        # a body the node would otherwise act on: still refused before it is read
        r = httpx.post(victim.http + "/v1/shards/fetch", content=b"x" * 100_000, timeout=30)
        assert r.status_code == 401
        assert bait_server.requests == []
        assert bait.host is not None
        assert victim.peer_id not in {str(p) for p in bait.host.get_connected_peers()}
        assert leftovers(victim.data_dir) == []
        assert not (victim.data_dir / "deployments" / f"{deployment}.json").exists()
    finally:
        bait.close()


# -- item 7: corrupt shards -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def rotten(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           deployment_dir: Path, hop: Hop) -> NodeProcess:
    """A node whose copy of the hop's shard had one byte flipped on disk before it started."""
    data_dir = tmp_path_factory.mktemp("rotten") / "D"
    ShardStore(data_dir).add_deployment(deployment_dir, only=[hop.shard.cid])
    flip_byte(data_dir / "shards" / f"{hop.shard.cid}.onnx")
    return stop_at_teardown(request, start_node(data_dir))


def test_a_corrupt_shard_is_refused_at_start_and_never_answered(
        rotten: NodeProcess, hop: Hop, client: ClientThread) -> None:
    path = rotten.data_dir / "shards" / f"{hop.shard.cid}.onnx"
    actual = cid_of_file(path)
    assert actual != hop.shard.cid
    assert rotten.info["shards"] == []  # started, without the corrupt shard
    errors = [line for line in rotten.log().splitlines() if " ERROR " in line]
    assert any(str(path) in line and hop.shard.cid in line and actual in line
               for line in errors), rotten.log()

    message = hop.request("rotten-1")
    response = client.run(exchange, rotten.addr, INFER, encode_frame(message))
    check_error(response, "corrupt_shard", "rotten-1")  # an error frame, not a signed answer
    assert response is not None and "signature" not in response
    assert hop.shard.cid in response["error"]["message"]

    metrics = httpx.get(rotten.http + "/metrics", timeout=10).text
    assert metric_value(metrics, "veilnet_corrupt_shards_total") == 1
    assert metric_value(metrics, "veilnet_errors_total", protocol=str(INFER),
                        code="corrupt_shard") == 1
    node = httpx.get(rotten.http + "/v1/node", timeout=10).json()
    assert node["shards"] == []
    card = verify_card(httpx.get(rotten.http + "/.well-known/agent-card.json", timeout=10).json())
    assert hop.shard.cid not in card.shard_cids


def test_a_shard_that_rots_while_the_node_runs_is_refused_on_load_then_repaired(
        rotten: NodeProcess, hop: Hop, deployment_dir: Path, client: ClientThread,
        capsys: pytest.CaptureFixture[str]) -> None:
    other = next(s for s in hop.manifest.node_shards if s.cid != hop.shard.cid)
    target = rotten.data_dir / "shards" / f"{other.cid}.onnx"
    shutil.copyfile(deployment_dir / other.path, target)  # appears beside a running node
    flip_byte(target)
    actual = cid_of_file(target)

    message = hop.request("rotten-2", shard=other.cid)  # the session is loaded on first use
    response = client.run(exchange, rotten.addr, INFER, encode_frame(message))
    check_error(response, "corrupt_shard", "rotten-2")
    assert any(" ERROR " in line and str(target) in line and other.cid in line and actual in line
               for line in rotten.log().splitlines()), rotten.log()
    metrics = httpx.get(rotten.http + "/metrics", timeout=10).text
    assert metric_value(metrics, "veilnet_corrupt_shards_total") == 2

    # the operator's check finds both files, names them and exits 1
    result = veilnet(capsys, "node", "check", str(rotten.data_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2, result.stdout
    for cid in (hop.shard.cid, other.cid):
        path = rotten.data_dir / "shards" / f"{cid}.onnx"
        assert any(str(path) in line and cid_of_file(path) in line for line in fails)
    assert "2 problem(s)" in result.stdout.splitlines()[-1]
    report = json.loads(veilnet(capsys, "node", "check", "--json", str(rotten.data_dir)).stdout)
    assert report["ok"] is False and report["shards"] == 2 and report["manifests"] == 1
    assert sorted((p["kind"], p["expected"]) for p in report["problems"]) == \
        sorted(("corrupt", c) for c in (hop.shard.cid, other.cid))

    # reinstalling replaces the corrupt copies; the running node serves them again
    result = veilnet(capsys, "node", "add-shards", str(rotten.data_dir), str(deployment_dir))
    assert result.returncode == 0, result.stderr
    result = veilnet(capsys, "node", "check", str(rotten.data_dir))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("ok: 1 manifest file(s) and 2 shard file(s)")
    client.run(valid_request, rotten, hop)  # a correct, signed answer
