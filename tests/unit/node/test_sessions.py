"""node/sessions.py (the session table: limits, expiry with an injected clock, binding to the
opening peer, close) and node/session_service.py driven without a network: its executor is a
stand-in whose "shard" appends its input to the cache, so what the service stores and returns
is checked exactly. Also the session settings of node/config.py and ``veilnet node start``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cbor2
import numpy as np
import pytest
import trio

from crypto.identity import Identity
from models import ShardSpec, TensorSpec, cid_of_bytes
from node.byzantine import Byzantine
from node.cli import main as veilnet_main
from node.config import ConfigError, NodeConfig, load_config
from node.metrics import NodeMetrics
from node.session_service import SessionService
from node.sessions import SessionLimits, SessionTable
from protocols.session import (
    CloseRequest,
    OpenRequest,
    StepRequest,
    check_close_reply,
    check_reply,
    session_io,
)
from protocols.wire import WireError, decode_body, tensors_digest

CID, DEPLOYMENT, OTHER = (cid_of_bytes(n) for n in (b"shard", b"deployment", b"other"))
KV = {"layout": ["batch", "kv_heads", "seq", "head_dim"], "past": ["past_key_0"],
      "present": ["present_key_0"]}
SHARD = ShardSpec(1, CID, "node", f"{CID}.onnx",
                  (TensorSpec("h", "float32", ("batch", "seq", 4)),
                   TensorSpec("past_key_0", "float32", ("batch", 1, "past", 4))),
                  (TensorSpec("out", "float32", ("batch", "seq", 4)),
                   TensorSpec("present_key_0", "float32", ("batch", 1, "total", 4))))
IO = session_io(SHARD, KV)
A, B = "12D3KooWPeerA", "12D3KooWPeerB"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(**limits: Any) -> tuple[SessionTable, Clock, list[str]]:
    clock, ended = Clock(), []
    return SessionTable(SessionLimits(**limits), clock, ended.append), clock, ended


def code_of(fn: Any, *args: Any) -> str:
    with pytest.raises(WireError) as info:
        fn(*args)
    return info.value.code


# -- the table ------------------------------------------------------------------------------------

def test_max_sessions_then_busy_and_close_frees_a_slot() -> None:
    t, _, ended = table(max_sessions=2)
    first = t.open(A, CID, IO, 1)
    assert first.running and len(first.id) == 32
    t.commit(first, {}, 3)
    second = t.open(B, CID, IO, 1)
    assert second.id != first.id
    assert code_of(t.open, A, CID, IO, 1) == "busy"
    t.close(A, first.id)
    assert ended == ["closed"] and len(t) == 1
    t.open(A, CID, IO, 1)
    assert len(t) == 2


def test_sessions_are_bound_to_the_peer_that_opened_them() -> None:
    t, _, _ = table()
    session = t.open(A, CID, IO, 1)
    t.commit(session, {}, 2)
    assert t.get(A, session.id) is session
    never = "0" * 32
    with pytest.raises(WireError) as other:
        t.acquire(B, session.id)
    with pytest.raises(WireError) as unknown:
        t.acquire(B, never)
    # the same code and the same words (but the id) for another peer's session and none at all
    assert other.value.code == unknown.value.code == "unknown_session"
    assert other.value.message.replace(session.id, never) == unknown.value.message
    assert code_of(t.close, B, session.id) == "unknown_session"
    assert t.get(A, session.id) is session  # still there for its owner


def test_one_call_at_a_time_per_session() -> None:
    t, _, _ = table()
    session = t.open(A, CID, IO, 1)
    assert code_of(t.acquire, A, session.id) == "busy"  # the prefill is still running
    t.commit(session, {"past_key_0": np.zeros((1, 1, 2, 4), np.float32)}, 2)
    assert t.acquire(A, session.id) is session
    assert code_of(t.acquire, A, session.id) == "busy"
    t.release(session)  # a failed step: the cache stays as it was
    assert session.position == 2 and t.acquire(A, session.id) is session


def test_idle_sessions_expire_but_never_mid_call() -> None:
    t, clock, ended = table(idle_expiry=10)
    idle, busy = t.open(A, CID, IO, 1), t.open(A, CID, IO, 1)
    t.commit(idle, {}, 1)
    t.commit(busy, {}, 1)
    clock.now += 9
    assert t.acquire(A, busy.id) is busy  # in use from here on
    clock.now += 2  # idle: 11 s since its last call; busy: running
    assert t.sweep() == 1 and ended == ["expired"]
    assert code_of(t.get, A, idle.id) == "unknown_session"
    t.release(busy)  # the call ends: the clock restarts from now
    clock.now += 9.5
    assert t.get(A, busy.id) is busy
    clock.now += 1
    assert code_of(t.acquire, A, busy.id) == "unknown_session"  # lazily swept
    assert len(t) == 0 and ended == ["expired", "expired"]


def test_context_limits() -> None:
    t, _, _ = table(max_context=16)
    t.check_room(1, 10, 6, None)
    assert code_of(t.check_room, 1, 10, 7, None) == "limit"
    t.check_room(2, 4, 4, None)  # 2 x 8 tokens of cache
    assert code_of(t.check_room, 2, 4, 5, None) == "limit"
    assert code_of(t.check_room, 1, 0, 9, 8) == "limit"  # the model's context length


def test_close_during_a_call_drops_its_cache_and_a_failed_prefill_leaves_nothing() -> None:
    t, _, ended = table()
    session = t.open(A, CID, IO, 1)
    t.commit(session, {}, 1)
    t.acquire(A, session.id)
    t.close(A, session.id)
    t.commit(session, {"past_key_0": np.zeros((1, 1, 2, 4), np.float32)}, 2)
    assert session.cache == {} and len(t) == 0
    failed = t.open(A, CID, IO, 1)
    t.fail(failed)
    assert code_of(t.get, A, failed.id) == "unknown_session"
    assert ended == ["closed", "failed"]


# -- the service, with a stand-in executor --------------------------------------------------------

class FakeExecutor:
    """``lookup``/``store``/``run`` as SessionService uses them. The "shard": present = past
    followed by ``h``; out = h + the number of tokens cached before each position."""

    def __init__(self) -> None:
        stored = SimpleNamespace(spec=SHARD, deployment=DEPLOYMENT)
        self.shards = {CID: stored}
        manifest = SimpleNamespace(extra={"kv_cache": KV, "config": {"context_length": 12}})
        self.store = SimpleNamespace(load_manifest=lambda cid: manifest)
        self.gate: trio.Event | None = None
        self.started = trio.Event()

    def lookup(self, cid: str) -> Any:
        if cid not in self.shards:
            raise WireError("unknown_shard", cid)
        return self.shards[cid]

    async def run(self, cid: str, feeds: dict[str, np.ndarray],
                  peer: str = "") -> dict[str, np.ndarray]:
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        past, h = feeds["past_key_0"], feeds["h"]
        offsets = past.shape[2] + np.arange(h.shape[1], dtype=np.float32)
        return {"out": h + offsets[None, :, None],
                "present_key_0": np.concatenate([past, h[:, None]], axis=2)}


def service(**limits: Any) -> tuple[SessionService, FakeExecutor, Identity]:
    identity, executor = Identity.generate(), FakeExecutor()
    svc = SessionService(identity, executor, NodeMetrics(), SessionLimits(**limits),  # type: ignore[arg-type]
                         Clock())
    return svc, executor, identity


def h(tokens: int, batch: int = 1, start: float = 0.0) -> dict[str, np.ndarray]:
    values = start + np.arange(batch * tokens * 4, dtype=np.float32).reshape(batch, tokens, 4)
    return {"h": values}


async def call(svc: SessionService, peer: str, request: Any) -> dict[str, Any]:
    """``request`` as the node receives it (CBOR over the wire), served for ``peer``."""
    return await svc.serve(peer, decode_body(cbor2.dumps(request.to_message())))


def test_service_open_step_close() -> None:
    svc, _, identity = service()

    async def main() -> None:
        prompt = h(3)
        opened = OpenRequest("o", CID, prompt)
        response = await call(svc, A, opened)
        reply = check_reply(response, opened, tensors_digest(prompt), identity.peer_id, SHARD,
                            IO.outputs)
        assert (reply.position_before, reply.position) == (0, 3)
        np.testing.assert_array_equal(reply.outputs["out"], prompt["h"] + np.array(
            [0, 1, 2], np.float32)[None, :, None])
        sid = reply.session
        for position in (3, 4):
            new = h(1, start=100.0 + position)
            step = StepRequest(f"s{position}", sid, new, position)
            reply = check_reply(await call(svc, A, step), step, tensors_digest(new),
                                identity.peer_id, SHARD, IO.outputs)
            assert reply.position == position + 1
            np.testing.assert_array_equal(reply.outputs["out"], new["h"] + position)
        session = svc.table.get(A, sid)
        assert session.cache["past_key_0"].shape == (1, 1, 5, 4)
        assert svc.status()["open"] == 1 and svc.status()["cache_bytes"] == 5 * 4 * 4
        close = CloseRequest("c", sid)
        check_close_reply(await call(svc, A, close), close)
        assert svc.status()["open"] == 0

    trio.run(main)


def test_service_errors_leave_the_session_usable() -> None:
    svc, executor, _ = service(max_sessions=2, max_context=8)

    async def main() -> None:
        response = await call(svc, A, OpenRequest("o", CID, h(4)))
        sid = response["session"]

        async def refused(peer: str, request: Any) -> str:
            with pytest.raises(WireError) as info:
                await call(svc, peer, request)
            return info.value.code

        nan = h(1)
        nan["h"][0, 0, 1] = np.nan
        cases = [
            (A, StepRequest("x", sid, {"h": np.zeros((1, 1, 5), np.float32)}), "bad_inputs"),
            (A, StepRequest("x", sid, {"h": np.zeros((1, 4), np.float32)}), "bad_inputs"),
            (A, StepRequest("x", sid, h(1, batch=2)), "bad_inputs"),
            (A, StepRequest("x", sid, nan), "bad_inputs"),
            (A, StepRequest("x", sid, h(1), position=3), "bad_position"),
            (A, StepRequest("x", sid, h(5)), "limit"),  # 4 + 5 > 8
            (B, StepRequest("x", sid, h(1)), "unknown_session"),
            (A, StepRequest("x", "e" * 32, h(1)), "unknown_session"),
            (A, OpenRequest("x", OTHER, h(1)), "unknown_shard"),
            (A, OpenRequest("x", CID, h(13)), "limit"),  # the model's context length is 12
        ]
        for peer, request, code in cases:
            assert await refused(peer, request) == code, request
        assert (await call(svc, A, StepRequest("ok", sid, h(1), position=4)))["position"] == 5
        await call(svc, B, OpenRequest("o2", CID, h(1)))
        assert await refused(A, OpenRequest("o3", CID, h(1))) == "busy"  # 2 sessions held

        # a second step while one runs: busy; the first one completes
        executor.gate = trio.Event()
        executor.started = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, svc, A, StepRequest("slow", sid, h(1)))
            await executor.started.wait()
            assert await refused(A, StepRequest("fast", sid, h(1))) == "busy"
            executor.gate.set()
        assert svc.table.get(A, sid).position == 6

    trio.run(main)


def test_a_shard_without_kv_cache_is_unsupported() -> None:
    svc, executor, _ = service()
    executor.store = SimpleNamespace(load_manifest=lambda cid: SimpleNamespace(extra={}))

    async def main() -> None:
        with pytest.raises(WireError) as info:
            await call(svc, A, OpenRequest("o", CID, h(1)))
        assert info.value.code == "unsupported" and "kv_cache" in info.value.message
        assert len(svc.table) == 0

    trio.run(main)


def test_a_byzantine_node_lies_in_session_answers_but_keeps_a_true_cache() -> None:
    svc, _, identity = service()
    svc.byzantine = Byzantine("zeros")

    async def main() -> None:
        prompt = h(2, start=1.0)
        request = OpenRequest("o", CID, prompt)
        reply = check_reply(await call(svc, A, request), request, tensors_digest(prompt),
                            identity.peer_id, SHARD, IO.outputs)  # signed as if right
        assert not reply.outputs["out"].any()
        cache = svc.table.get(A, reply.session).cache["past_key_0"]
        np.testing.assert_array_equal(cache[:, 0], prompt["h"])

    trio.run(main)


# -- settings -------------------------------------------------------------------------------------

def test_session_settings_defaults_file_and_flags(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": tmp_path})
    assert config.session_limits() == SessionLimits(16, 2048, 300.0)
    path = tmp_path / "node.toml"
    path.write_text('data_dir = "d"\nmax_sessions = 4\nmax_context = 512\nsession_expiry = 30\n')
    config = load_config(path, {"max_context": 1024})
    assert config.session_limits() == SessionLimits(4, 1024, 30)
    for key, value in [("max_sessions", 0), ("max_context", 0), ("session_expiry", 0)]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, {"data_dir": tmp_path, key: value})
    path.write_text('data_dir = "d"\nmax_sessions = "4"\n')
    with pytest.raises(ConfigError, match="max_sessions"):
        load_config(path, {})
    assert NodeConfig().max_sessions == 16


def test_start_help_names_the_session_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        veilnet_main(["node", "start", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--max-sessions N", "--max-context TOKENS", "--session-expiry SECONDS",
                  "/veilnet/session/1", "(default 16)", "(default 2048)", "(default 300)"):
        assert words in out, words
