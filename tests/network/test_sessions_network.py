"""/veilnet/session/1 against a real ``veilnet node start`` process serving the first node shard
(decoder layers 0-9) of the plaintext SmolLM2-135M import, with real libp2p hosts on the test
side (TCP, Noise, yamux).

- A prompt's prefill and eight single-token steps through a session equal the same shard run
  in-process with onnxruntime, its past/present cache carried explicitly by the test; every
  answer passes the caller's checks (``protocols.session.check_reply``: digests, signature).
- Limits: the node holds at most 3 sessions (``busy``), 24 tokens of cache each (``limit``) and
  drops a session idle for 3 s (``unknown_session``, and /healthz counts it gone).
- A session is bound to the host that opened it: another host gets ``unknown_session``.
- Malformed steps get their error on the same stream, and the session then serves a valid step.

One node process serves the whole module (started with the short limits above).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from libp2p.abc import IHost, INetStream
from node_helpers import (
    ClientThread,
    NodeProcess,
    client_host,
    metric_value,
    run_trio,
    start_node,
    stop_at_teardown,
    wait_for,
)
from tokenizers import Tokenizer

from models import Manifest, ShardSession, ShardSpec
from node.store import ShardStore
from protocols.session import (
    SESSION,
    CloseRequest,
    OpenRequest,
    SessionIO,
    SessionReply,
    StepRequest,
    check_close_reply,
    check_reply,
    session_io,
)
from protocols.transport import (
    RemoteError,
    close_quietly,
    ensure_connected,
    exchange,
    open_stream,
)
from protocols.wire import encode_tensors, tensors_digest

MAX_SESSIONS, MAX_CONTEXT, EXPIRY = 3, 24, 3.0
PER_PEER = 2  # sessions one peer may hold: half of MAX_SESSIONS, rounded up
PROMPT = ("The quick brown fox jumps over the lazy dog near the river bank, while the sun "
          "sets slowly behind the old stone mill.")
PREFILL, STEPS = 12, 8
TOLERANCE = 1e-4
SESSION_P = str(SESSION)


@dataclass
class Generation:
    """The first node shard, its session view, the prompt's activations and the expected
    hidden outputs, computed in-process with an explicitly carried KV cache."""

    shard: ShardSpec
    io: SessionIO
    embed: np.ndarray  # hidden_embed [1, PREFILL + STEPS, 576]
    expected: list[np.ndarray]  # the prefill's output, then one per step
    hidden_out: str
    uncached: np.ndarray  # the output of one run over all PREFILL + STEPS tokens, no cache

    def prompt(self) -> dict[str, np.ndarray]:
        return {self.shard.inputs[0].name: self.embed[:, :PREFILL]}

    def token(self, i: int) -> dict[str, np.ndarray]:
        """The activations of token PREFILL + i."""
        return {self.shard.inputs[0].name: self.embed[:, PREFILL + i:PREFILL + i + 1]}


@pytest.fixture(scope="module")
def gen(smollm2_dir: Path) -> Generation:
    manifest = Manifest.load(smollm2_dir)
    ids = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(PROMPT).ids
    assert len(ids) >= PREFILL + STEPS
    head, shard = manifest.head, manifest.node_shards[0]
    embed = ShardSession(smollm2_dir / head.path, head).run(
        {"input_ids": np.array([ids[:PREFILL + STEPS]], dtype=np.int64)})["hidden_embed"]
    hidden_in = "hidden_embed"
    hidden_out = next(t.name for t in shard.outputs if not t.name.startswith("present_"))
    runner = ShardSession(smollm2_dir / shard.path, shard)
    past = {t.name: np.zeros((1, t.shape[1], 0, t.shape[3]), np.float32)
            for t in shard.inputs if t.name.startswith("past_")}
    expected = []
    for start, stop in [(0, PREFILL), *((i, i + 1) for i in range(PREFILL, PREFILL + STEPS))]:
        out = runner.run({hidden_in: embed[:, start:stop], **past})
        past = {name.replace("present_", "past_", 1): value for name, value in out.items()
                if name.startswith("present_")}
        assert all(v.shape[2] == stop for v in past.values())
        expected.append(out[hidden_out])
    empty = {name: value[:, :, :0] for name, value in past.items()}
    uncached = runner.run({hidden_in: embed, **empty})[hidden_out]
    return Generation(shard, session_io(shard, manifest.extra["kv_cache"]), embed, expected,
                      hidden_out, uncached)


@pytest.fixture(scope="module")
def llm_node(request: pytest.FixtureRequest, smollm2_dir: Path, gen: Generation,
             tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("llm") / "D"
    ShardStore(data_dir).add_deployment(smollm2_dir, [gen.shard.cid])
    return stop_at_teardown(request, start_node(
        data_dir, "--max-sessions", str(MAX_SESSIONS), "--max-context", str(MAX_CONTEXT),
        "--session-expiry", str(EXPIRY), "--request-timeout", "20"))


@pytest.fixture(scope="module")
def client() -> Iterator[ClientThread]:
    thread = ClientThread().start()
    yield thread
    thread.close()


# -- helpers --------------------------------------------------------------------------------------

def rid() -> str:
    return secrets.token_hex(16)


class Caller:
    """One session stream to the node (several requests on it), with the caller's checks."""

    def __init__(self, host: IHost, node: NodeProcess, gen: Generation) -> None:
        self.host, self.node, self.gen = host, node, gen
        self.stream: INetStream | None = None

    async def __aenter__(self) -> Caller:
        peer = await ensure_connected(self.host, self.node.peer_id, [self.node.addr], 10)
        self.stream = await open_stream(self.host, peer, SESSION)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.stream is not None:
            await close_quietly(self.stream)

    async def send(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.stream is not None
        with trio.fail_after(20):
            return await exchange(self.stream, message)

    async def call(self, request: OpenRequest | StepRequest) -> SessionReply:
        response = await self.send(request.to_message())
        return check_reply(response, request, tensors_digest(request.inputs), self.node.peer_id,
                           self.gen.shard, self.gen.io.outputs)

    async def open(self, inputs: dict[str, np.ndarray] | None = None) -> SessionReply:
        return await self.call(OpenRequest(rid(), self.gen.shard.cid,
                                           self.gen.prompt() if inputs is None else inputs))

    async def step(self, session: str, inputs: dict[str, np.ndarray],
                   position: int | None = None) -> SessionReply:
        return await self.call(StepRequest(rid(), session, inputs, position))

    async def close(self, session: str) -> None:
        request = CloseRequest(rid(), session)
        check_close_reply(await self.send(request.to_message()), request)

    async def refused(self, message: dict[str, Any]) -> str:
        """The error code the node answers ``message`` with."""
        try:
            response = await self.send(message)
        except RemoteError as exc:
            return exc.code
        raise AssertionError(f"no error: {sorted(response)}")


def max_diff(reply: SessionReply, want: np.ndarray, name: str) -> float:
    assert reply.outputs is not None
    got = reply.outputs[name]
    assert got.shape == want.shape and got.dtype == want.dtype
    return float(np.abs(got - want).max())


def sessions_open(node: NodeProcess) -> int:
    r = httpx.get(node.http + "/healthz", timeout=10)
    assert r.status_code == 200
    return int(r.json()["sessions"])


# -- (a) a generation's steps ---------------------------------------------------------------------

def test_steps_equal_an_in_process_run_with_a_carried_cache(
        llm_node: NodeProcess, gen: Generation, client: ClientThread) -> None:
    async def main(host: IHost) -> list[float]:
        async with Caller(host, llm_node, gen) as c:
            opened = await c.open()
            diffs = [max_diff(opened, gen.expected[0], gen.hidden_out)]
            assert (opened.position_before, opened.position) == (0, PREFILL)
            session = opened.session
            try:
                for i in range(STEPS):
                    reply = await c.step(session, gen.token(i), PREFILL + i)
                    assert (reply.session, reply.position) == (session, PREFILL + i + 1)
                    diffs.append(max_diff(reply, gen.expected[i + 1], gen.hidden_out))
            finally:
                await c.close(session)
            assert await c.refused(StepRequest(rid(), session, gen.token(0)).to_message()) \
                == "unknown_session"
            return diffs

    diffs = client.run(main)
    print(f"session vs in-process max |diff| per call: {max(diffs):.3g} ({diffs})")
    assert max(diffs) <= TOLERANCE
    # and the cached computation is the causal one: one run over the whole sequence agrees
    # (to float32 summation order: measured 4e-5)
    cached = np.concatenate(gen.expected, axis=1)
    print(f"cached vs one uncached run: {np.abs(cached - gen.uncached).max():.3g}")
    np.testing.assert_allclose(cached, gen.uncached, atol=1e-3, rtol=0)


# -- (b) limits -----------------------------------------------------------------------------------

def test_max_sessions_and_max_context(llm_node: NodeProcess, gen: Generation,
                                      client: ClientThread) -> None:
    wait_for(lambda: sessions_open(llm_node) == 0, "sessions left by other tests to end",
             EXPIRY + 10)

    async def main(host: IHost) -> None:
        async with Caller(host, llm_node, gen) as c:
            # one peer may hold half the table (rounded up); the rest is another peer's
            opened = [await c.open() for _ in range(PER_PEER)]
            try:
                message = OpenRequest(rid(), gen.shard.cid, gen.prompt()).to_message()
                assert await c.refused(message) == "busy"  # its own share is used up
                async with client_host() as host2, Caller(host2, llm_node, gen) as other:
                    theirs = [await other.open() for _ in range(MAX_SESSIONS - PER_PEER)]
                    assert sessions_open(llm_node) == MAX_SESSIONS
                    message = OpenRequest(rid(), gen.shard.cid, gen.prompt()).to_message()
                    assert await other.refused(message) == "busy"  # the table is full
                    for reply in theirs:
                        await other.close(reply.session)
                first = opened[0].session
                await c.close(first)
                opened[0] = await c.open()  # the slot is free again
                session = opened[0].session
                # 12 cached + 13 new > 24: refused, and the cache is untouched
                too_many = {gen.shard.inputs[0].name: gen.embed[:, :13]}
                assert await c.refused(StepRequest(rid(), session, too_many).to_message()) \
                    == "limit"
                fill = {gen.shard.inputs[0].name: gen.embed[:, :MAX_CONTEXT - PREFILL]}
                assert (await c.step(session, fill, PREFILL)).position == MAX_CONTEXT
                assert await c.refused(StepRequest(rid(), session, gen.token(0)).to_message()) \
                    == "limit"
            finally:
                for reply in opened:
                    await c.close(reply.session)
            long_prompt = np.concatenate([gen.embed, gen.embed], axis=1)[:, :MAX_CONTEXT + 1]
            message = OpenRequest(rid(), gen.shard.cid,
                                  {gen.shard.inputs[0].name: long_prompt}).to_message()
            assert await c.refused(message) == "limit"

    client.run(main)
    assert sessions_open(llm_node) == 0


def test_an_idle_session_expires(llm_node: NodeProcess, gen: Generation,
                                 client: ClientThread) -> None:
    async def open_one(host: IHost) -> str:
        async with Caller(host, llm_node, gen) as c:
            reply = await c.open()
            assert (await c.step(reply.session, gen.token(0), PREFILL)).position == PREFILL + 1
            return reply.session

    session = client.run(open_one)
    assert sessions_open(llm_node) >= 1
    # the node's background sweep drops it, with no request to trigger it
    wait_for(lambda: sessions_open(llm_node) == 0, "the idle session to expire", EXPIRY + 10)

    async def step_again(host: IHost) -> str:
        async with Caller(host, llm_node, gen) as c:
            return await c.refused(StepRequest(rid(), session, gen.token(1)).to_message())

    assert client.run(step_again) == "unknown_session"


# -- (c) binding ----------------------------------------------------------------------------------

def test_a_session_is_bound_to_the_host_that_opened_it(
        llm_node: NodeProcess, gen: Generation, client: ClientThread) -> None:
    session = client.run(_open_session, llm_node, gen)

    async def intruder() -> list[str]:
        async with client_host() as other, Caller(other, llm_node, gen) as c:
            never = secrets.token_hex(16)
            return [await c.refused(StepRequest(rid(), session, gen.token(0)).to_message()),
                    await c.refused(CloseRequest(rid(), session).to_message()),
                    await c.refused(StepRequest(rid(), never, gen.token(0)).to_message())]

    assert run_trio(intruder) == ["unknown_session"] * 3

    async def owner(host: IHost) -> SessionReply:
        async with Caller(host, llm_node, gen) as c:
            try:
                return await c.step(session, gen.token(0), PREFILL)
            finally:
                await c.close(session)

    reply = client.run(owner)  # the intruder's close did not close it
    assert max_diff(reply, gen.expected[1], gen.hidden_out) <= TOLERANCE


async def _open_session(host: IHost, node: NodeProcess, gen: Generation) -> str:
    async with Caller(host, node, gen) as c:
        return (await c.open()).session


# -- (d) malformed steps --------------------------------------------------------------------------

def test_malformed_steps_get_errors_and_the_session_keeps_serving(
        llm_node: NodeProcess, gen: Generation, client: ClientThread) -> None:
    name = gen.shard.inputs[0].name
    token = gen.token(0)[name]

    def step(session: str, value: np.ndarray) -> dict[str, Any]:
        return StepRequest(rid(), session, {name: value}).to_message()

    async def main(host: IHost) -> tuple[list[tuple[str, str]], list[tuple[str, str]], float]:
        async with Caller(host, llm_node, gen) as c:
            session = (await c.open()).session
            closed = (await c.open()).session
            await c.close(closed)
            nan = token.copy()
            nan[0, 0, 7] = np.nan
            good = step(session, token)
            zero_cache = encode_tensors({"past_key_0": np.zeros((1, 3, 0, 64), np.float32)})
            cases = [
                ("hidden size", step(session, token[:, :, :575]), "bad_inputs"),
                ("rank", step(session, token[0]), "bad_inputs"),
                ("batch", step(session, np.concatenate([token, token])), "bad_inputs"),
                ("NaN", step(session, nan), "bad_inputs"),
                ("float64", step(session, token.astype(np.float64)), "bad_inputs"),
                ("a cache input", {**good, "inputs": {**good["inputs"], **zero_cache}},
                 "bad_inputs"),
                ("unknown session", step(secrets.token_hex(16), token), "unknown_session"),
                ("after close", step(closed, token), "unknown_session"),
                ("wrong position", {**good, "position": PREFILL + 5}, "bad_position"),
                ("missing op", {k: v for k, v in good.items() if k != "op"}, "bad_request"),
                ("unknown op", {**good, "op": "rewind"}, "bad_request"),
                ("bad session id", {**good, "session": "../" + session}, "bad_request"),
                ("no inputs", {k: v for k, v in good.items() if k != "inputs"}, "bad_request"),
                ("bad tensor", {**good, "inputs": {name: {
                    "dtype": "float32", "shape": [1, 1, 576], "data": b"\0"}}}, "bad_tensor"),
                ("version", {**good, "v": 2}, "unsupported_version"),
            ]
            got = [(what, await c.refused(message)) for what, message, _ in cases]
            try:  # the same stream, the same session: the step now runs as if nothing happened
                reply = await c.step(session, gen.token(0), PREFILL)
            finally:
                await c.close(session)
            assert reply.position == PREFILL + 1
            want = [(what, code) for what, _, code in cases]
            return got, want, max_diff(reply, gen.expected[1], gen.hidden_out)

    got, want, diff = client.run(main)
    assert got == want
    assert diff <= TOLERANCE


# -- metrics and status ---------------------------------------------------------------------------

def test_metrics_and_status_show_sessions(llm_node: NodeProcess, gen: Generation,
                                          client: ClientThread) -> None:
    def scrape() -> str:
        return httpx.get(llm_node.http + "/metrics", timeout=10).text

    before = scrape()

    async def main(host: IHost) -> None:
        async with Caller(host, llm_node, gen) as c:
            session = (await c.open()).session
            await c.step(session, gen.token(0), PREFILL)
            text = scrape()
            assert metric_value(text, "veilnet_sessions_open") >= 1
            assert metric_value(text, "veilnet_session_cache_bytes") > 0
            status = httpx.get(llm_node.http + "/v1/node", timeout=10).json()["sessions"]
            assert status["open"] >= 1 and status["max_sessions"] == MAX_SESSIONS
            assert status["max_context"] == MAX_CONTEXT and status["idle_expiry_s"] == EXPIRY
            await c.close(session)
            assert await c.refused(StepRequest(rid(), session, gen.token(1)).to_message()) \
                == "unknown_session"

    client.run(main)
    after = scrape()

    def delta(sample: str, **labels: str) -> float:
        return metric_value(after, sample, **labels) - metric_value(before, sample, **labels)

    assert delta("veilnet_session_steps_total", op="open") == 1
    assert delta("veilnet_session_steps_total", op="step") == 1
    assert delta("veilnet_sessions_ended_total", reason="closed") == 1
    assert delta("veilnet_errors_total", protocol=SESSION_P, code="unknown_session") == 1
    assert delta("veilnet_requests_total", protocol=SESSION_P) == 4
