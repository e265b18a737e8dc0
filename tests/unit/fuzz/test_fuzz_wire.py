"""Fuzzing the frame codec (protocols/wire.py): every byte a peer sends first goes through the
varint header, ``scan_items``, ``decode_body`` and the tensor decoder. Each must return or raise
WireError (docs/protocol.md: ``bad_frame``, ``truncated``, ``frame_too_large``, ``bad_tensor``,
...), never anything else, never hang."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
from fuzzkit import budget, check, leaves, mutated_bytes, mutated_tree, run_now, values
from hypothesis import given
from hypothesis import strategies as st

from models import cid_of_bytes
from protocols.wire import (
    MAX_FRAME_ITEMS,
    WireError,
    check_envelope,
    decode_body,
    decode_tensor,
    decode_tensors,
    encode_frame,
    encode_tensors,
    encode_varint,
    read_frame,
    read_frame_length,
    scan_items,
)

CID = cid_of_bytes(b"fuzz shard")
FEEDS = {"hidden": np.arange(24, dtype=np.float32).reshape(1, 3, 8) / 7,
         "mask": np.ones((1, 3), dtype=np.int64), "flag": np.array([True, False])}
MESSAGE = {"v": 1, "id": "req-1", "shard": CID, "want": "outputs",
           "inputs": encode_tensors(FEEDS)}
FRAME = encode_frame(MESSAGE)
BODY = cbor2.dumps(MESSAGE)
# a body with many small items, to mutate the container headers scan_items walks
ITEMS_BODY = cbor2.dumps({"v": 1, "id": "x", "peers": [
    {"peer_id": "p" * 10, "addrs": ["/ip4/1.2.3.4/tcp/1"] * 3, "shards": [CID] * 4,
     "age": 1.5} for _ in range(6)]})

IN_MEMORY = "a decoder on an in-memory stream (it should never wait)"


class BytesStream:
    """A stream that hands out ``data`` in reads of at most ``step`` bytes, then EOF."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    async def read(self, n: int | None = None) -> bytes:
        n = self.step if n is None else min(n, self.step)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        raise AssertionError("the decoder wrote to the stream")


def read_all(data: bytes, step: int, limit: int) -> list[dict[str, Any]]:
    """Every frame in ``data`` (read_frame until the clean end of the stream)."""
    stream, frames = BytesStream(data, step), []
    while (frame := run_now(read_frame(stream, limit), IN_MEMORY)) is not None:
        assert isinstance(frame, dict)
        frames.append(frame)
    return frames


# -- frames -------------------------------------------------------------------------------------

@budget(150)
@given(st.binary(max_size=200), st.integers(1, 64), st.sampled_from([16, 256, 1 << 20]))
def test_read_frame_arbitrary_bytes(data: bytes, step: int, limit: int) -> None:
    check("wire.read_frame[bytes]", read_all, data, step, limit, errors=WireError)


@budget(150)
@given(st.data(), st.integers(1, 4096), st.sampled_from([64, 1 << 16, 1 << 20]))
def test_read_frame_mutated_frames(data: st.DataObject, step: int, limit: int) -> None:
    stream = FRAME + encode_frame({"v": 1, "id": "second"})
    mutated = data.draw(mutated_bytes(stream))
    got = check("wire.read_frame[mutated]", read_all, mutated, step, limit, errors=WireError)
    if mutated == stream and limit >= len(FRAME):
        assert got and got[0]["id"] == "req-1"


@budget(100)
@given(st.binary(max_size=12))
def test_read_frame_length(data: bytes) -> None:
    got = check("wire.read_frame_length",
                lambda: run_now(read_frame_length(BytesStream(data, 1)), IN_MEMORY),
                errors=WireError)
    if got is not None and not isinstance(got, bool) and not hasattr(got, "error"):
        assert 0 <= got < 1 << 63
        assert encode_varint(got) == data[:len(encode_varint(got))]


@budget(150)
@given(st.binary(max_size=300))
def test_decode_body_arbitrary_bytes(data: bytes) -> None:
    got = check("wire.decode_body[bytes]", decode_body, data, errors=WireError)
    if got:
        assert isinstance(got, dict)


@budget(200)
@given(st.data())
def test_decode_body_mutated(data: st.DataObject) -> None:
    body = data.draw(mutated_bytes(data.draw(st.sampled_from([BODY, ITEMS_BODY]))))
    got = check("wire.decode_body[mutated]", decode_body, body, errors=WireError)
    if not isinstance(got, dict):
        return
    # what decode_body accepts, scan_items accepts too: the two agree on the limits
    assert check("wire.scan_items[agrees]", scan_items, body, errors=()) <= MAX_FRAME_ITEMS


@budget(100)
@given(st.data())
def test_scan_items_mutated(data: st.DataObject) -> None:
    body = data.draw(mutated_bytes(data.draw(st.sampled_from([BODY, ITEMS_BODY])), max_ops=6))
    check("wire.scan_items", scan_items, body, max_items=data.draw(st.integers(1, 500)),
          max_depth=data.draw(st.integers(1, 16)), errors=WireError)


@budget(100)
@given(values(cbor_specials=True))
def test_decode_body_of_any_cbor_value(value: Any) -> None:
    """Any value cbor2 encodes (deep nesting, huge ints, NaN, undefined) as a frame body."""
    try:
        body = cbor2.dumps({"v": 1, "x": value})
    except (ValueError, TypeError, RecursionError, OverflowError):
        return
    check("wire.decode_body[values]", decode_body, body, errors=WireError)


# -- envelope and tensors -----------------------------------------------------------------------

@budget(100)
@given(st.data())
def test_check_envelope(data: st.DataObject) -> None:
    message = data.draw(mutated_tree({"v": 1, "id": "req-1", "shard": CID}, cbor_specials=True))
    if isinstance(message, dict):
        check("wire.check_envelope", check_envelope, message, errors=WireError)


@budget(150)
@given(st.data())
def test_decode_tensors_mutated(data: st.DataObject) -> None:
    tensors = data.draw(mutated_tree(MESSAGE["inputs"], cbor_specials=True))
    got = check("wire.decode_tensors", decode_tensors, tensors, "'inputs'", errors=WireError)
    if got:
        assert all(isinstance(v, np.ndarray) for v in got.values())


@budget(100)
@given(st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(
    ["float32", "int64", "bool", "uint64", "float16", "object", "complex64", "<f4", "V8"]),
    leaves(cbor_specials=True)),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 1 << 33), st.booleans(),
                                          st.floats()), max_size=10), leaves()),
    "data": st.one_of(st.binary(max_size=64), leaves())}))
def test_decode_tensor_fields(tensor: dict[str, Any]) -> None:
    check("wire.decode_tensor", decode_tensor, tensor, "t", errors=WireError)
