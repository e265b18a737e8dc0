"""``veilnet node start --record-received DIR`` against real node processes: a MiniLM query
through one node holding both node shards is recorded as exactly what the client sent, and so
are a session's open and step on a node serving SmolLM2's first decoder shard.

What the client sends is computed independently, in-process: the deployment's client head runs
on the tokenized texts and each node shard's feeds are taken as the pipeline hands them over
(node shards run in-process with onnxruntime too). The feeds of the first node shard come from
the client's own head and must be bit-identical; those of the second come from the node's answer
to the first, so they are compared with a tight tolerance.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import trio
from libp2p.abc import IHost
from node_helpers import (
    NodeProcess,
    client_host,
    run_trio,
    serving_node,
    start_node,
    stop_at_teardown,
)

from client import Client
from crypto.identity import Identity
from models import Manifest, Pipeline, ShardSession, ShardSpec, read_views
from node.store import ShardStore
from protocols import INFER
from protocols.session import (
    SESSION,
    OpenRequest,
    SessionReply,
    StepRequest,
    check_reply,
    session_io,
)
from protocols.transport import close_quietly, ensure_connected, exchange, open_stream
from protocols.wire import tensors_digest

TEXTS = ["A man is eating food.", "Recording shows exactly what a node sees."]


@pytest.fixture(scope="module")
def recording(request: pytest.FixtureRequest, deployment_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[NodeProcess, Path]:
    base = tmp_path_factory.mktemp("record")
    rec = base / "received"
    node = serving_node(request, base / "D", deployment_dir, "--record-received", str(rec),
                        "--record-max-mb", "64", "--request-timeout", "20")
    return node, rec


def _sent(deployment_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per node shard CID: the feeds the client hands over for TEXTS."""
    manifest = Manifest.load(deployment_dir)
    sessions = {s.cid: ShardSession(deployment_dir / s.path, s) for s in manifest.node_shards}
    feeds: dict[str, dict[str, np.ndarray]] = {}

    def runner(shard: ShardSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds[shard.cid] = {k: np.array(v, copy=True) for k, v in inputs.items()}
        return sessions[shard.cid].run(inputs)

    Pipeline(deployment_dir, node_runner=runner).embed(TEXTS)
    return feeds


def test_recorded_views_are_what_the_client_sent(recording: tuple[NodeProcess, Path],
                                                 deployment_dir: Path) -> None:
    node, rec = recording
    assert "RECORDING RECEIVED TENSORS" in node.log()  # logged loudly at every start
    identity = Identity.generate()
    with Client([node.addr], deployment_dir, verify="none", ledger=False, spot_rate=0.0,
                identity=identity) as client:
        result = client.embed(TEXTS)
    manifest = Manifest.load(deployment_dir)
    assert [h.shard_cid for h in result.hops] == [s.cid for s in manifest.node_shards]

    views = read_views(rec)
    assert len(views) == len(manifest.node_shards)
    by_id = {v.request_id: v for v in views}
    assert sorted(by_id) == sorted(h.request_id for h in result.hops)
    sent = _sent(deployment_dir)
    for number, hop in enumerate(result.hops):
        view = by_id[hop.request_id]
        assert (view.protocol, view.op, view.session) == (str(INFER), "infer", None)
        assert view.shard == hop.shard_cid
        assert view.peer == identity.peer_id
        got = view.load()
        want = sent[hop.shard_cid]
        assert sorted(got) == sorted(want) == sorted(
            t.name for t in manifest.node_shards[number].inputs)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
            if number == 0:  # computed by the client alone: bit for bit
                assert np.array_equal(got[name], tensor), name
            else:  # from the node's answer to the previous hop
                np.testing.assert_allclose(got[name], tensor, rtol=1e-5, atol=1e-5)
        entry = {i.name: i for i in view.inputs}
        assert all(entry[n].dtype == str(want[n].dtype) for n in want)

    # sensitive files: the directory 0700, every file 0600
    assert stat.S_IMODE(rec.stat().st_mode) == 0o700
    files = [p for p in rec.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    line = json.loads((rec / "index.jsonl").read_text().splitlines()[0])
    assert line["format"] == "veilnet-received/1"

    # the node still answers, and records the next query too
    with Client([node.addr], deployment_dir, verify="none", ledger=False,
                spot_rate=0.0) as client:
        again = client.embed(TEXTS[:1])
    assert len(again.hops) == len(manifest.node_shards)
    assert len(read_views(rec)) == 2 * len(manifest.node_shards)
    assert node.proc.poll() is None


def test_session_open_and_step_are_recorded(smollm2_dir: Path, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    manifest = Manifest.load(smollm2_dir)
    shard = manifest.node_shards[0]
    hidden = next(t for t in shard.inputs if not t.name.startswith("past_"))
    ShardStore(tmp_path / "D").add_deployment(smollm2_dir, [shard.cid])
    rec = tmp_path / "received"
    node = stop_at_teardown(request, start_node(tmp_path / "D", "--record-received", str(rec),
                                                "--request-timeout", "20"))
    rng = np.random.default_rng(7)
    width = int(hidden.shape[-1])
    prompt = {hidden.name: rng.standard_normal((1, 4, width)).astype(np.float32)}
    token = {hidden.name: rng.standard_normal((1, 1, width)).astype(np.float32)}
    outputs = session_io(shard, manifest.extra["kv_cache"]).outputs

    async def main(host: IHost) -> tuple[str, str]:
        peer = await ensure_connected(host, node.peer_id, [node.addr], 10)
        stream = await open_stream(host, peer, SESSION)
        try:
            async def call(req: OpenRequest | StepRequest) -> SessionReply:
                with trio.fail_after(20):
                    response = await exchange(stream, req.to_message())
                return check_reply(response, req, tensors_digest(req.inputs), node.peer_id,
                                   shard, outputs)

            opened = await call(OpenRequest("open-1", shard.cid, prompt))
            stepped = await call(StepRequest("step-1", opened.session, token, 4))
            assert stepped.position == 5
            return opened.session, str(host.get_id())
        finally:
            await close_quietly(stream)

    async def with_host() -> tuple[str, str]:
        async with client_host() as host:
            return await main(host)

    session, peer_id = run_trio(with_host)
    views = read_views(rec)
    assert [(v.protocol, v.op, v.request_id) for v in views] == [
        (str(SESSION), "open", "open-1"), (str(SESSION), "step", "step-1")]
    for view, sent in zip(views, (prompt, token), strict=True):
        assert (view.shard, view.session, view.peer) == (shard.cid, session, peer_id)
        got = view.load()
        assert list(got) == [hidden.name]
        assert np.array_equal(got[hidden.name], sent[hidden.name])
    assert node.proc.poll() is None
