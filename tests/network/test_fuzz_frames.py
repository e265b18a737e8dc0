"""Fuzz a real node over libp2p: mutated valid frames on real streams, for every protocol.

One ``veilnet node start`` process (``--ledger``, so it also serves /veilnet/ledger/1 and
/veilnet/witness/1) holds the node shard of a tiny random llama decoder (a ``kv_cache``
manifest: /veilnet/infer/1 runs it with explicit past tensors, /veilnet/session/1 really opens
sessions on it; building the MiniLM deployment would take most of the time budget). For each
protocol the test builds VALID requests with the project's own encoders (``protocols/``), then
hypothesis mutates them:

- raw frame bytes: flips, truncation, extension, insertion, a replaced length prefix;
- CBOR fields: dropped, replaced by a value of the wrong type (huge and negative integers,
  bignums, NaN, long strings, bytes, deep nesting), unknown fields added;
- tensors: wrong dtypes, huge / negative / too many dimensions, data of the wrong length.

Each mutated frame goes to the node on a fresh stream from a real libp2p host (TCP, Noise,
yamux); the writer then half-closes. The node must answer with one well-formed frame (an error
``{error: {code, message}}`` with a documented code other than ``internal``, or an answer that
echoes the id) or close the stream, within its request timeout. After each protocol's run the
node process is alive, ``/healthz`` is ok and ``/metrics`` counts no ``internal`` error; at the
end a valid infer request is still answered correctly.

Budget: ``max_examples`` per protocol below (``VEILNET_FUZZ=long``: 20 times more),
``derandomize=True``. The inputs each protocol ran are printed at the end of the module and,
with ``VEILNET_FUZZ_NET_REPORT=PATH``, merged into the JSON object at PATH
(``{"frames:/veilnet/infer/1": 60, ...}``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import httpx
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.abc import IHost
from node_helpers import (
    ClientThread,
    NodeProcess,
    exchange,
    metric_value,
    start_node,
    stop_at_teardown,
)

from models import Manifest, ShardSession, ShardSpec, cid_of_file
from models.importer import write_sharded
from models.llama_graph import LlamaConfig, build_llama_decoder
from models.llama_import import llama_cuts
from node.store import ShardStore
from protocols import CARDS, INFER, LEDGER, PEERS, SESSION, SHARD, WITNESS, PeerRecord
from protocols.cards import CardLookup
from protocols.infer import CkksRequest, InferRequest, MaskSeed, check_reply
from protocols.ledger import LedgerRequest
from protocols.session import CloseRequest, OpenRequest, StepRequest
from protocols.transport import PEER_ERRORS, close_quietly, connect, peer_info
from protocols.wire import (
    DTYPES,
    MAX_ERROR_CHARS,
    encode_frame,
    encode_varint,
    read_frame,
)
from protocols.witness import Offer

LONG = os.environ.get("VEILNET_FUZZ") == "long"
EXAMPLES = 70 * (20 if LONG else 1)  # per protocol
REQUEST_TIMEOUT = 5.0  # the node's --request-timeout: no answer may take longer than this
ANSWER_S = REQUEST_TIMEOUT + 10.0  # the test side's bound on one exchange
CODES = {"bad_frame", "frame_too_large", "truncated", "timeout", "unsupported_version",
         "bad_request", "bad_tensor", "unknown_shard", "corrupt_shard", "bad_inputs",
         "run_failed", "busy", "unknown_session", "limit", "bad_position", "unsupported",
         "not_found", "no_ledger", "bad_context", "bad_parameters", "bad_ciphertext"}
PROTOCOLS = [INFER, SESSION, SHARD, PEERS, CARDS, LEDGER, WITNESS]
COUNTS: Counter[str] = Counter()  # inputs run per protocol
OUTCOMES: dict[str, Counter[str]] = {str(p): Counter() for p in PROTOCOLS}
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


# -- the node -------------------------------------------------------------------------------------

def tiny_decoder(out: Path) -> Path:
    """A random 2-layer llama decoder with a ``kv_cache`` manifest (one node shard)."""
    cfg = LlamaConfig(n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, ffn=24,
                      vocab=32, rope_theta=10000.0, rms_eps=1e-5, context_length=64)
    rng = np.random.default_rng(7)
    d, hd = cfg.d_model, cfg.head_dim
    w = {"token_embd.weight": rng.normal(size=(cfg.vocab, d)),
         "output_norm.weight": 1 + 0.1 * rng.normal(size=d)}
    shapes = {"attn_norm": (d,), "attn_q": (2 * hd, d), "attn_k": (hd, d), "attn_v": (hd, d),
              "attn_output": (d, 2 * hd), "ffn_norm": (d,), "ffn_gate": (cfg.ffn, d),
              "ffn_up": (cfg.ffn, d), "ffn_down": (d, cfg.ffn)}
    for i in range(cfg.n_layers):
        for kind, shape in shapes.items():
            w[f"blk.{i}.{kind}.weight"] = (1 + 0.1 * rng.normal(size=shape) if len(shape) == 1
                                           else rng.normal(size=shape) / np.sqrt(shape[1]))
    config = {"family": "llama-decoder", "num_layers": 2, "hidden_size": d, "num_heads": 2,
              "num_kv_heads": 1, "head_dim": hd, "intermediate_size": cfg.ffn,
              "vocab_size": cfg.vocab, "context_length": cfg.context_length}
    kv = {"layout": ["batch", "kv_heads", "seq", "head_dim"],
          "past": [f"past_{k}_{i}" for i in range(2) for k in ("key", "value")],
          "present": [f"present_{k}_{i}" for i in range(2) for k in ("key", "value")]}
    write_sharded(build_llama_decoder(cfg, {k: v.astype(np.float32) for k, v in w.items()}),
                  llama_cuts(2, 1), out, "tiny-llama", {"config": config, "kv_cache": kv})
    return out


@dataclass
class Target:
    node: NodeProcess
    client: ClientThread
    infer_shard: ShardSpec
    infer_feeds: dict[str, np.ndarray]
    infer_expected: dict[str, np.ndarray]
    manifest_cid: str
    decoder_shard: str
    session: str  # a session the client opened on the decoder shard
    note: str  # the node's ledger checkpoint


def feeds_for(spec: ShardSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and ranks: symbolic dimensions 1 (batch) or 3."""
    feeds = {}
    for t in spec.inputs:
        shape = [d if isinstance(d, int) else (1 if k == 0 else 3) for k, d in enumerate(t.shape)]
        if t.dtype.startswith("float"):
            feeds[t.name] = rng.normal(size=shape).astype(t.dtype)
        else:
            feeds[t.name] = np.ones(shape, dtype=t.dtype)
    return feeds


async def _call(host: IHost, addr: str, protocol: Any, message: dict[str, Any]) -> Any:
    return await exchange(host, addr, protocol, encode_frame(message), close_write=True)


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzzframes")
    decoder_dir = tiny_decoder(root / "decoder")
    data_dir = root / "D"
    ShardStore(data_dir).add_deployment(decoder_dir)
    node = stop_at_teardown(request, start_node(
        data_dir, "--ledger", "--request-timeout", str(REQUEST_TIMEOUT), "--idle-timeout", "5",
        "--max-sessions", "64"))
    client = ClientThread().start()
    try:
        shard = Manifest.load(decoder_dir).node_shards[0]
        feeds = feeds_for(shard, np.random.default_rng(1))
        expected = ShardSession(decoder_dir / shard.path, shard).run(feeds)
        opened = client.run(_call, node.addr, SESSION, OpenRequest(
            "open-1", shard.cid, {"hidden_embed": np.ones((1, 2, 16), np.float32)}
        ).to_message())
        assert opened is not None and "error" not in opened, opened
        checkpoint = client.run(_call, node.addr, LEDGER,
                                LedgerRequest("checkpoint").to_message("cp-1"))
        assert checkpoint is not None and isinstance(checkpoint.get("note"), str), checkpoint
        yield Target(node, client, shard, feeds, expected,
                     cid_of_file(decoder_dir / "manifest.json"), shard.cid, opened["session"],
                     checkpoint["note"])
    finally:
        client.close()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the inputs each protocol ran, and merge them into $VEILNET_FUZZ_NET_REPORT."""
    yield
    counts = {f"frames:{p}": COUNTS[str(p)] for p in PROTOCOLS if COUNTS[str(p)]}
    write_report(request.config, counts, {f"frames:{p}": OUTCOMES[str(p)] for p in PROTOCOLS})


def write_report(config: pytest.Config, counts: dict[str, int],
                 detail: dict[str, Counter[str]]) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write("\n")
        for name, n in counts.items():
            outcomes = ", ".join(f"{k} {v}"
                                 for k, v in sorted(detail.get(name, Counter()).items()))
            line = f"fuzz {name}: {n} inputs" + (f" ({outcomes})" if outcomes else "")
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line)
    path = os.environ.get("VEILNET_FUZZ_NET_REPORT")
    if path and counts:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        doc.update(counts)
        Path(path).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


# -- valid requests, built with the project's encoders --------------------------------------------

def rid() -> str:
    return secrets.token_hex(16)


def valid_messages(t: Target, protocol: str, client_peer: str) -> list[dict[str, Any]]:
    if protocol == str(INFER):
        shape = tuple(int(d) for d in t.infer_feeds[t.infer_shard.inputs[0].name].shape)
        return [InferRequest(rid(), t.infer_shard.cid, t.infer_feeds).to_message(),
                InferRequest(rid(), t.infer_shard.cid, t.infer_feeds, "fingerprint").to_message(),
                InferRequest(rid(), t.infer_shard.cid, seeds={
                    s.name: MaskSeed(bytes(32), shape, 1.0) for s in t.infer_shard.inputs[:1]}
                    ).to_message(),
                CkksRequest(rid(), t.infer_shard.cid, b"\x00" * 64, [b"\x01" * 32]).to_message()]
    if protocol == str(SESSION):
        hidden = np.full((1, 1, 16), 0.5, np.float32)
        return [OpenRequest(rid(), t.decoder_shard, {"hidden_embed": hidden}).to_message(),
                StepRequest(rid(), t.session, {"hidden_embed": hidden}).to_message(),
                StepRequest(rid(), t.session, {"hidden_embed": hidden}, 2,
                            "fingerprint").to_message(),
                CloseRequest(rid(), secrets.token_hex(16)).to_message()]
    if protocol == str(SHARD):
        return [{"v": 1, "id": rid(), "cid": t.manifest_cid},
                {"v": 1, "id": rid(), "cid": t.decoder_shard}]
    if protocol == str(PEERS):
        own = PeerRecord(client_peer, "", ["/ip4/127.0.0.1/tcp/1"], [t.infer_shard.cid],
                         "http://127.0.0.1:1").to_json()
        own.pop("did")
        return [{"v": 1, "id": rid(), "node": None}, {"v": 1, "id": rid(), "node": own}]
    if protocol == str(CARDS):
        return [CardLookup().to_message(rid()),
                CardLookup(deployment=t.manifest_cid, shard=t.infer_shard.cid,
                           model="minilm").to_message(rid())]
    if protocol == str(LEDGER):
        return [LedgerRequest("checkpoint").to_message(rid()),
                LedgerRequest("checkpoint", size=0).to_message(rid()),
                LedgerRequest("proof", index=0, size=1).to_message(rid()),
                LedgerRequest("consistency", old=0, new=0).to_message(rid()),
                LedgerRequest("rankings").to_message(rid()),
                LedgerRequest("append", entry=cbor2.dumps({"kind": "x"})).to_message(rid())]
    if protocol == str(WITNESS):
        return [Offer(t.note, 0, []).to_message(rid()),
                Offer(t.note, 1, [bytes(32)]).to_message(rid())]
    raise AssertionError(protocol)


# -- mutations ------------------------------------------------------------------------------------

def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for k in range(depth):
        value = [value] if k % 2 else {"k": value}
    return value


NASTY = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # past 64 bits cbor2 writes a bignum tag
    st.sampled_from([0, -1, 1, 2**31, 2**31 - 1, 2**63, 2**64 - 1, -(2**64)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.sampled_from(["", "x" * 300, "\u0000", "z" + "2" * 5000]),
    st.binary(max_size=80),
    st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=6),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.builds(nested, st.integers(min_value=1, max_value=40), st.integers()),
)
BAD_DTYPES = st.one_of(st.sampled_from(sorted(DTYPES)),
                       st.sampled_from(["float128", "object", "<f4", "U8", "V16", "complex64",
                                        "str", "", "float32 ", "bfloat16"]), NASTY)
BAD_SHAPES = st.one_of(
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=10),
    st.lists(st.sampled_from([0, 1, 3, 2**31 - 1, 2**31, 2**32, -1]), max_size=10),
    NASTY)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key / index path into maps and lists (not into tensor data)."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((*prefix, k))
            out.extend(paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            out.append((*prefix, i))
            out.extend(paths(v, (*prefix, i)))
    return out


def parent_of(message: Any, path: tuple[Any, ...]) -> Any:
    node = message
    for key in path[:-1]:
        node = node[key]
    return node


def tensors_in(message: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(message, dict):
        if {"dtype", "shape", "data"} <= set(message):
            found.append(message)
        for v in message.values():
            found.extend(tensors_in(v))
    elif isinstance(message, list):
        for v in message:
            found.extend(tensors_in(v))
    return found


def mutate_fields(data: st.DataObject, message: dict[str, Any]) -> dict[str, Any]:
    """One to three field-level mutations of a copy of ``message``."""
    message = copy.deepcopy(message)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="field mutations")):
        kind = data.draw(st.sampled_from(["replace", "replace", "drop", "add", "add", "tensor",
                                          "tensor", "tensor", "top", "top", "envelope"]),
                         label="kind")
        if kind == "envelope":  # the version and id are checked before any other field
            key = data.draw(st.sampled_from(["v", "id"]), label="envelope key")
            if data.draw(st.booleans(), label="drop envelope key"):
                message.pop(key, None)
            else:
                message[key] = data.draw(NASTY, label="envelope value")
            continue
        tensors = tensors_in(message)
        if kind == "tensor" and tensors:
            tensor = data.draw(st.sampled_from(tensors), label="tensor")
            part = data.draw(st.sampled_from(["dtype", "shape", "data", "drop", "values",
                                              "reshape", "reshape", "retype"]), label="part")
            if part in ("reshape", "retype"):  # a well-formed tensor the shard may not take
                dims = tensor["shape"] if isinstance(tensor["shape"], list) else [1]
                if not all(type(d) is int and 0 <= d <= 1024 for d in dims):
                    dims = [1]
                dims = list(dims)
                dtype = tensor["dtype"] if isinstance(tensor["dtype"], str) \
                    and tensor["dtype"] in DTYPES else "float32"
                if part == "retype":
                    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="new dtype")
                elif dims and data.draw(st.booleans(), label="one dim"):
                    k = data.draw(st.integers(0, len(dims) - 1), label="dim")
                    dims[k] = data.draw(st.sampled_from([0, 1, 2, 5, 70, 600]), label="size")
                else:
                    dims = data.draw(st.lists(st.integers(0, 6), max_size=5), label="dims")
                count = math.prod(dims)
                tensor["dtype"], tensor["shape"] = dtype, dims
                tensor["data"] = np.random.default_rng(count).normal(size=count).astype(
                    dtype).tobytes() if count <= 1 << 20 else b""
            elif part == "values":  # the same bytes count: NaN, inf, denormals, garbage
                raw = tensor["data"] if isinstance(tensor["data"], bytes) else b""
                fill = data.draw(st.sampled_from([b"\xff", b"\x7f\x80\x00\x00"[::-1], b"\x00",
                                                  b"\x01\x00\x80\x7f"]), label="fill")
                tensor["data"] = (fill * (len(raw) // len(fill) + 1))[:len(raw)]
            elif part == "dtype":
                tensor["dtype"] = data.draw(BAD_DTYPES, label="dtype")
            elif part == "shape":
                tensor["shape"] = data.draw(BAD_SHAPES, label="shape")
            elif part == "data":
                raw = tensor["data"] if isinstance(tensor["data"], bytes) else b""
                cut = data.draw(st.integers(0, len(raw) + 16), label="cut")
                tensor["data"] = (raw[:cut] if cut <= len(raw)
                                  else raw + data.draw(st.binary(min_size=1, max_size=16)))
            else:
                tensor.pop(data.draw(st.sampled_from(["dtype", "shape", "data"])), None)
            continue
        if kind == "top":  # the envelope and top-level fields are where parsing starts
            key = data.draw(st.sampled_from(sorted({"op", "shard", "inputs", "cid",
                                                    "node", "entry", "note", "old", "proof",
                                                    "want", "encryption", "session",
                                                    "position", "size", "index", *message}
                                                   - {"v", "id"},
                                                   key=str)), label="top key")
            message[key] = data.draw(NASTY, label="top value")
            continue
        all_paths = [p for p in paths(message) if p not in (("v",), ("id",))]
        if kind == "add" or not all_paths:
            maps = [()] + [p for p in all_paths if isinstance(_get(message, p), dict)]
            where = data.draw(st.sampled_from(maps), label="map")
            target_map = _get(message, where)
            target_map[data.draw(st.one_of(st.text(max_size=12), st.binary(max_size=4)),
                                 label="unknown key")] = data.draw(NASTY, label="unknown value")
            continue
        path = data.draw(st.sampled_from(all_paths), label="path")
        parent = parent_of(message, path)
        if kind == "drop":
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(NASTY, label="value")
    return message


def _get(message: Any, path: tuple[Any, ...]) -> Any:
    node = message
    for key in path:
        node = node[key]
    return node


def encode_any(message: dict[str, Any]) -> bytes:
    """The frame of ``message``; keys cbor2 cannot order are written as they come."""
    body = cbor2.dumps(message)
    return encode_varint(len(body)) + body


def mutate_bytes(data: st.DataObject, frame: bytes) -> bytes:
    """One to four byte-level mutations of an encoded frame (positions favour the header)."""
    out = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4), label="byte mutations")):
        size = len(out)
        pos = data.draw(st.one_of(st.integers(0, min(size, 96)), st.integers(0, size)),
                        label="position")
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert",
                                          "prefix", "delete"]), label="byte kind")
        if kind == "flip" and pos < size:
            out[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "set" and pos < size:
            out[pos] = data.draw(st.sampled_from([0x00, 0xff, 0x7f, 0x80, 0xbf, 0x9f, 0x5f,
                                                  0xc2, 0xd9, 0xf7, 0x1b, 0xfb]), label="byte")
        elif kind == "truncate":
            del out[pos:]
        elif kind == "extend":
            out += data.draw(st.binary(min_size=1, max_size=64), label="tail")
        elif kind == "insert":
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="inserted")
        elif kind == "delete":
            del out[pos:pos + data.draw(st.integers(1, 16), label="deleted")]
        elif kind == "prefix":  # a new length prefix: maybe huge, non-minimal or unterminated
            body = _body_of(bytes(out))
            out = bytearray(data.draw(st.one_of(
                st.integers(0, 2**63 - 1).map(encode_varint),
                st.binary(min_size=1, max_size=10)), label="prefix") + body)
    return bytes(out)


def _body_of(frame: bytes) -> bytes:
    for k, byte in enumerate(frame[:9]):
        if not byte & 0x80:
            return frame[k + 1:]
    return frame


# -- checks ---------------------------------------------------------------------------------------

def check_answer(protocol: str, answer: Any, sent: dict[str, Any] | None) -> str:
    """The outcome of one exchange ('closed', an error code or 'answer'); fails on anything a
    node must never send."""
    if answer is None:
        return "closed"
    assert isinstance(answer, dict), answer
    assert answer.get("v") == 1, answer
    if "error" in answer:
        error = answer["error"]
        # {code, message}; more fields (e.g. busy's retry_after) are allowed: unknown fields
        # are ignored within a wire version
        assert isinstance(error, dict) and {"code", "message"} <= set(error), error
        assert isinstance(error["code"], str) and isinstance(error["message"], str), error
        # cut at MAX_ERROR_CHARS, plus the "... (N characters)" note protocols.wire adds
        assert error["message"] and len(error["message"]) <= MAX_ERROR_CHARS + 40, error
        assert error["code"] != "internal", f"{protocol}: internal error: {error['message']}"
        assert error["code"] in CODES, error
        return str(error["code"])
    if sent is not None:
        assert answer.get("id") == sent.get("id"), (answer.get("id"), sent.get("id"))
    return "answer"


def send(t: Target, protocol: Any, payload: bytes) -> Any:
    """One exchange; None when the node closed or reset the stream without a frame."""
    async def run(host: IHost) -> Any:
        try:
            return await exchange(host, t.node.addr, protocol, payload, close_write=True,
                                  timeout=ANSWER_S)
        except trio.TooSlowError:
            raise AssertionError(f"{protocol}: no answer within {ANSWER_S} s "
                                 f"to {payload[:80]!r}") from None
        except PEER_ERRORS:
            return None
    return t.client.run(run)


CLOSING = {"frame_too_large", "truncated", "timeout", "busy"}  # the node then closes the stream


def send_then_valid(t: Target, protocol: Any, payload: bytes,
                    follow: dict[str, Any]) -> tuple[Any, Any]:
    """Two requests on one stream (/veilnet/infer/1 and /veilnet/session/1 carry several): a
    mutated frame that is still framed right, then the valid ``follow``. Both answers."""
    async def run(host: IHost) -> tuple[Any, Any]:
        info = peer_info(t.node.addr)
        try:
            await connect(host, info, 10)
            with trio.fail_after(ANSWER_S):
                stream = await host.new_stream(info.peer_id, [protocol])
                try:
                    await stream.write(payload + encode_frame(follow))
                    await stream.close()
                    first = await read_frame(stream)
                    return first, await read_frame(stream) if first is not None else None
                finally:
                    await close_quietly(stream)
        except trio.TooSlowError:
            raise AssertionError(f"{protocol}: no answers within {ANSWER_S} s "
                                 f"to {payload[:80]!r}") from None
        except PEER_ERRORS:
            return None, None
    return t.client.run(run)


def metrics(t: Target) -> str:
    return httpx.get(t.node.http + "/metrics", timeout=10).text


def assert_node_healthy(t: Target, protocol: str) -> None:
    assert t.node.proc.poll() is None, f"the node died:\n{t.node.log()[-4000:]}"
    health = httpx.get(t.node.http + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    internal = sum(metric_value(metrics(t), "veilnet_errors_total", protocol=str(p),
                                code="internal") for p in PROTOCOLS)
    if internal:
        log = t.node.log()
        at = log.find("Traceback")
        raise AssertionError(f"after fuzzing {protocol}: {internal:g} internal errors; "
                             f"node log:\n{log[max(0, at - 500):][:6000]}")


# -- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [str(p) for p in PROTOCOLS])
def test_mutated_frames_get_error_frames_and_the_node_keeps_serving(
        target: Target, protocol: str) -> None:
    client_peer = target.client.identity.peer_id
    bases = valid_messages(target, protocol, client_peer)
    # a valid request to send after a mutated one on the same stream, and its outcome
    follow, follow_outcome = {
        str(INFER): (bases[0], "answer"),
        str(SESSION): (CloseRequest(rid(), "0" * 32).to_message(), "unknown_session"),
    }.get(protocol, (None, None))
    for base in bases:  # the unmutated requests are answered (or refused) cleanly too
        check_answer(protocol, send(target, protocol, encode_frame(base)), base)

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        base = data.draw(st.sampled_from(bases), label="valid request")
        base = {**base, "id": rid()} if isinstance(base.get("id"), str) else base
        level = data.draw(st.sampled_from(["fields"] * 6 + ["bytes"] * 3 + ["both"]),
                          label="level")
        sent: dict[str, Any] | None = None
        if level == "bytes":
            payload = mutate_bytes(data, encode_frame(base))
        else:
            sent = mutate_fields(data, base)
            try:
                payload = encode_any(sent)
            except (TypeError, ValueError, cbor2.CBOREncodeError):
                payload = encode_frame(base)
                sent = base
            if level == "both":
                payload, sent = mutate_bytes(data, payload), None
        COUNTS[protocol] += 1
        echo = sent if isinstance(sent, dict) and isinstance(sent.get("id"), str) \
            and sent.get("v") == 1 else None
        if level == "fields" and follow is not None and data.draw(st.booleans(),
                                                                  label="then a valid one"):
            follow_up = {**follow, "id": rid()}
            first, second = send_then_valid(target, protocol, payload, follow_up)
            outcome = check_answer(protocol, first, echo)
            if first is not None and outcome not in CLOSING:
                # an error that leaves the framing intact keeps the stream serving
                assert second is not None, f"the stream closed after {outcome}"
                assert check_answer(protocol, second, follow_up) == follow_outcome, second
        else:
            outcome = check_answer(protocol, send(target, protocol, payload), echo)
        OUTCOMES[protocol][outcome] += 1

    fuzz()
    assert_node_healthy(target, protocol)


def test_the_node_still_answers_a_valid_request_after_the_fuzzing(target: Target) -> None:
    request = InferRequest(rid(), target.infer_shard.cid, target.infer_feeds)
    answer = send(target, INFER, encode_frame(request.to_message()))
    assert answer is not None and "error" not in answer, answer
    reply = check_reply(answer, request, request.input_digest(), target.node.peer_id,
                        target.infer_shard)
    for name, want in target.infer_expected.items():
        np.testing.assert_allclose(reply.outputs[name], want, rtol=1e-4, atol=1e-4)
    assert_node_healthy(target, "all protocols")



@pytest.mark.parametrize("fields", [{"op": "checkpoint", "size": 2**64 - 1},
                                    {"op": "proof", "index": 2**63},
                                    {"op": "consistency", "old": 0, "new": 2**64 - 1}])
def test_ledger_numbers_past_64_bits_get_bad_request(target: Target,
                                                     fields: dict[str, Any]) -> None:
    """Found by fuzzing the HTTP side of the same calls: a size past SQLite's integers was an
    OverflowError in the store (``internal`` on the wire, 500 over HTTP)."""
    message = {"v": 1, "id": "big-1", **fields}
    answer = send(target, LEDGER, encode_frame(message))
    assert answer is not None and answer["id"] == "big-1", answer
    assert answer["error"]["code"] == "bad_request", answer
    assert str(2**63 - 1) in answer["error"]["message"]
    assert_node_healthy(target, str(LEDGER))
