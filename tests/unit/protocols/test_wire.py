"""protocols/wire.py: varints, length-prefixed CBOR frames, tensors, digests and receipt payloads.

The network edge is faked by an in-memory byte stream (``MemoryStream``) that hands out data in
small pieces, the way a real stream may; everything else is the real code.
"""

from __future__ import annotations

import hashlib
import struct
import time
import tracemalloc

import cbor2
import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols.infer import RECEIPT_DOMAIN, receipt_payload
from protocols.wire import (
    DEFAULT_FRAME_LIMIT,
    DTYPES,
    MAX_DEPTH,
    MAX_ERROR_CHARS,
    MAX_FRAME_ITEMS,
    THREAD_DECODE_BYTES,
    WIRE_VERSION,
    WireError,
    decode_body,
    decode_frame_body,
    decode_tensor,
    decode_tensors,
    encode_frame,
    encode_tensor,
    encode_tensors,
    encode_varint,
    read_frame,
    read_frame_length,
    scan_items,
    tensors_digest,
    write_frame,
)


class MemoryStream:
    """An in-memory ByteStream: reads return at most ``piece`` bytes; b"" at the end."""

    def __init__(self, data: bytes = b"", piece: int = 3) -> None:
        self.data = bytearray(data)
        self.pos = 0
        self.piece = piece
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = self.piece if n is None else min(n, self.piece)
        chunk = bytes(self.data[self.pos:self.pos + size])
        self.pos += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data


def read_length(data: bytes) -> int | None:
    return trio.run(read_frame_length, MemoryStream(data))


def read_one(data: bytes, limit: int = DEFAULT_FRAME_LIMIT, piece: int = 3):
    return trio.run(read_frame, MemoryStream(data, piece), limit)


def wire_error(fn, *args) -> WireError:
    with pytest.raises(WireError) as info:
        fn(*args)
    return info.value


# -- varints --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"),
    (1, b"\x01"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (255, b"\xff\x01"),
    (300, b"\xac\x02"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (DEFAULT_FRAME_LIMIT, b"\x80\x80\x80\x20"),
    (DEFAULT_FRAME_LIMIT + 1, b"\x81\x80\x80\x20"),
    (2**63 - 1, b"\xff" * 8 + b"\x7f"),
])
def test_varint_known_encodings(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert read_length(encoded) == value


@pytest.mark.parametrize("value", [-1, 2**63, 2**64])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert 1 <= len(encoded) <= 9
    assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80
    assert read_length(encoded + b"trailing") == value  # reads exactly the header


@pytest.mark.parametrize("header", [b"\x80\x00", b"\x81\x00", b"\xff\x80\x00"])
def test_non_minimal_varint_is_refused(header: bytes) -> None:
    assert wire_error(read_length, header).code == "bad_frame"


@pytest.mark.parametrize("header", [b"\xff" * 9, b"\x80" * 9 + b"\x01", b"\xff" * 20])
def test_varint_longer_than_nine_bytes_is_refused(header: bytes) -> None:
    err = wire_error(read_length, header)
    assert err.code == "bad_frame"
    assert "9" in err.message


def test_varint_end_of_stream() -> None:
    assert read_length(b"") is None  # clean end before any header byte
    assert wire_error(read_length, b"\x80").code == "truncated"
    assert wire_error(read_length, b"\xff\xff").code == "truncated"


# -- frames ---------------------------------------------------------------------------------------

MESSAGES = [
    {},
    {"v": 1, "id": "abc", "shard": "bafk", "nested": {"a": [1, 2, {"b": b"\x00\xff"}]}},
    {"v": 1, "id": "x" * 128, "big": b"\x01" * 70_000, "f": 1.5, "n": None, "t": True},
    {"unicode": "東京 — ünïcödé", "neg": -(2**40)},
]


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_frame_round_trip(message: dict, piece: int) -> None:
    frame = encode_frame(message)
    body = cbor2.dumps(message)
    assert frame == encode_varint(len(body)) + body
    assert read_one(frame, piece=piece) == message


def test_several_frames_on_one_stream_then_clean_end() -> None:
    async def main() -> list:
        out = MemoryStream()
        for m in MESSAGES:
            await write_frame(out, m)
        stream = MemoryStream(bytes(out.written), piece=5)
        got = [await read_frame(stream) for _ in MESSAGES]
        got.append(await read_frame(stream))
        return got

    assert trio.run(main) == [*MESSAGES, None]


def test_frame_limit() -> None:
    message = {"data": b"\x00" * 1000}
    body_len = len(cbor2.dumps(message))
    frame = encode_frame(message)
    assert read_one(frame, limit=body_len) == message  # exactly at the limit: accepted
    err = wire_error(read_one, frame, body_len - 1)
    assert err.code == "frame_too_large"
    assert str(body_len) in err.message


def test_oversize_header_is_refused_before_the_body_is_read() -> None:
    stream = MemoryStream(encode_varint(DEFAULT_FRAME_LIMIT + 1))  # no body at all
    with pytest.raises(WireError) as info:
        trio.run(read_frame, stream, DEFAULT_FRAME_LIMIT)
    assert info.value.code == "frame_too_large"


@pytest.mark.parametrize("cut", [1, 2, 10])
def test_truncated_body(cut: int) -> None:
    frame = encode_frame({"v": 1, "id": "abcdefghijklmnop"})
    assert wire_error(read_one, frame[:-cut]).code == "truncated"


@pytest.mark.parametrize("body", [
    b"\xff",                      # a lone "break"
    b"\xa1",                      # map of one entry with nothing in it
    b"\xa1\x61",                  # truncated key
    b"\x5f\x41",                  # unterminated indefinite byte string
    b"\x1c",                      # reserved additional information
    b"\xa2\x61a\x01\x61a\x02",    # duplicate map key
    b"\x81" * 40 + b"\xa0",       # nested deeper than 16
    b"\x7f\xff\xff",              # bad text string
    b"\x62\xff\xfe",              # text string that is not UTF-8
])
def test_garbage_cbor_is_bad_frame(body: bytes) -> None:
    assert wire_error(decode_body, body).code == "bad_frame"
    assert wire_error(read_one, encode_varint(len(body)) + body).code == "bad_frame"


@pytest.mark.parametrize("value", [[1, 2, 3], 42, "text", b"bytes", None, True, 1.5])
def test_frames_must_be_maps(value: object) -> None:
    body = cbor2.dumps(value)
    err = wire_error(decode_body, body)
    assert err.code == "bad_frame"
    assert "map" in err.message


def test_trailing_bytes_after_the_map_are_refused() -> None:
    """A body is one CBOR map of exactly ``length`` bytes (docs/protocol.md); extra data after
    the map means the frame is malformed."""
    assert wire_error(decode_body, cbor2.dumps({"v": 1}) + b"\x00").code == "bad_frame"


TAGGED = {
    "datetime (tag 1)": cbor2.dumps({"v": cbor2.CBORTag(1, 0)}),
    "bignum (tag 2)": cbor2.dumps({"v": cbor2.CBORTag(2, b"\x01")}),
    "date string (tag 0)": cbor2.dumps({"v": cbor2.CBORTag(0, "2020-01-01T00:00:00Z")}),
    "decimal fraction (tag 4)": cbor2.dumps({"v": cbor2.CBORTag(4, [-1, 15])}),
    "URI (tag 32)": cbor2.dumps({"v": cbor2.CBORTag(32, "http://x")}),
    "date (tag 100)": cbor2.dumps({"v": cbor2.CBORTag(100, 0)}),
    "set (tag 258)": cbor2.dumps({"v": cbor2.CBORTag(258, [1])}),
    "self-describe (tag 55799)": cbor2.dumps(cbor2.CBORTag(55799, {"v": 1})),
    "unknown tag 65536": cbor2.dumps({"v": cbor2.CBORTag(65536, 1)}),
    "unknown tag 4000 nested": cbor2.dumps({"a": [{"b": cbor2.CBORTag(4000, "x")}]}),
}


@pytest.mark.parametrize("body", list(TAGGED.values()), ids=list(TAGGED))
def test_cbor_tags_are_rejected(body: bytes) -> None:
    """docs/protocol.md: "every CBOR tag rejected" -- including tags cbor2 would decode itself."""
    assert wire_error(decode_body, body).code == "bad_frame"


# -- item bounds (issue 12 item 3) ----------------------------------------------------------------

def _padded(body_map: bytes) -> bytes:
    """``body_map`` is a one-entry map's CBOR minus its header; add a byte-string entry that
    makes the body longer than MAX_FRAME_ITEMS bytes, so decode_body runs the pre-scan."""
    return b"\xa2\x61p\x5a" + (MAX_FRAME_ITEMS + 1).to_bytes(4, "big") \
        + b"\x00" * (MAX_FRAME_ITEMS + 1) + body_map


def test_memory_bomb_is_refused_before_any_object_is_built() -> None:
    """A 16 MiB frame holding one array of 16M empty arrays: passed the depth limit and took
    a node from 725 MB to 1.95 GB before the "must be a map" check."""
    count = 16 * 1024 * 1024 - 16
    body = b"\xa1\x61a\x9a" + count.to_bytes(4, "big") + b"\x80" * count
    tracemalloc.start()
    try:
        started = time.perf_counter()
        err = wire_error(decode_body, body)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.code == "bad_frame"
    assert f"more than {MAX_FRAME_ITEMS} CBOR items" in err.message
    assert peak < 16 << 20, f"decoding allocated {peak >> 20} MiB"
    assert elapsed < 5.0


def test_a_top_level_array_bomb_is_refused_by_its_first_byte() -> None:
    body = b"\x9a" + (1 << 24).to_bytes(4, "big") + b"\x80" * (1 << 24)
    err = wire_error(scan_items, body)
    assert err.code == "bad_frame" and "map" in err.message


@pytest.mark.parametrize("extra", [0, 1])
def test_item_limit_is_exact(extra: int) -> None:
    """{"a": [0, ...]}: the map, the key, the array and n elements; a body of more bytes
    than the limit, so the pre-scan runs."""
    n = MAX_FRAME_ITEMS - 3 + extra
    body = cbor2.dumps({"a": [1000] * n})  # 3 bytes each: longer than MAX_FRAME_ITEMS bytes
    assert len(body) > MAX_FRAME_ITEMS
    if extra:
        assert wire_error(decode_body, body).code == "bad_frame"
    else:
        assert scan_items(body) == MAX_FRAME_ITEMS
        assert decode_body(body) == {"a": [1000] * n}


@pytest.mark.parametrize(("name", "entry"), [
    ("tag", b"\x61t\xc1\x00"),                          # tag 1 (datetime)
    ("big tag", b"\x61t\xd9\xd9\xf7\x00"),               # tag 55799
    ("indefinite array", b"\x61t\x9f\x00\xff"),
    ("indefinite map", b"\x61t\xbf\xff"),
    ("indefinite text", b"\x61t\x7f\x61a\xff"),
    ("reserved info 28", b"\x61t\x1c"),
    ("reserved info 30", b"\x61t\xfe"),
    ("too deep", b"\x61t" + b"\x81" * (MAX_DEPTH + 1) + b"\x00"),
    ("container longer than the body", b"\x61t\x9b" + (1 << 62).to_bytes(8, "big")),
    ("string longer than the body", b"\x61t\x5b" + (1 << 62).to_bytes(8, "big")),
    ("cut inside an argument", b"\x61t\x19\x01"),
    ("trailing bytes", b"\x61t\x00\x00"),
    ("missing value", b"\x61t"),
])
def test_pre_scan_refuses_malformed_big_frames(name: str, entry: bytes) -> None:
    body = _padded(entry)
    assert len(body) > MAX_FRAME_ITEMS
    assert wire_error(scan_items, body).code == "bad_frame"
    assert wire_error(decode_body, body).code == "bad_frame"


def test_depth_limit_matches_cbor2() -> None:
    """Nested non-empty containers count as cbor2's max_depth counts them: the deepest frame
    cbor2 accepts passes the pre-scan, one level more fails both."""
    deepest = {"a": [0]}
    for _ in range(MAX_DEPTH - 2):
        deepest = {"a": deepest}
    body = _padded(cbor2.dumps(deepest)[1:])
    assert scan_items(body) > 0
    assert decode_body(body)["a"] == deepest["a"]
    too_deep = _padded(cbor2.dumps({"a": deepest})[1:])
    assert wire_error(scan_items, too_deep).code == "bad_frame"


def test_non_string_map_keys_are_refused() -> None:
    """Integer, float and array keys hash predictably in Python (a map of colliding keys
    costs quadratic time to build); veilnet maps have text keys only."""
    for key in (1, 1.5, (1, 2)):
        assert wire_error(decode_body, cbor2.dumps({"v": 1, key: 0})).code == "bad_frame"


def _cbor_values(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=5), max_leaves=40)


@settings(max_examples=150, deadline=None)
@given(_cbor_values(st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1)
                    | st.floats(allow_nan=False) | st.text(max_size=20)
                    | st.binary(max_size=20)))
def test_pre_scan_accepts_whatever_we_encode(value: object) -> None:
    message = {"v": 1, "x": value}
    body = cbor2.dumps(message)
    assert scan_items(body) == _count(message)
    assert decode_body(_padded(cbor2.dumps({"x": value})[1:]))["x"] == value


def _count(value: object) -> int:
    if isinstance(value, dict):
        return 1 + sum(_count(k) + _count(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    return 1


def test_big_frames_are_decoded_off_the_event_loop() -> None:
    """A body over THREAD_DECODE_BYTES is decoded in a worker thread; the loop keeps ticking."""
    message = {"v": 1, "id": "big", "blob": b"\x07" * (2 * THREAD_DECODE_BYTES)}
    body = cbor2.dumps(message)

    async def main() -> tuple[dict, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            await trio.sleep(0)
            before = ticks
            decoded = await decode_frame_body(body)
            nursery.cancel_scope.cancel()
        return decoded, ticks - before

    decoded, ticks = trio.run(main)
    assert decoded == message
    assert ticks >= 1  # the ticker ran while the body was being decoded
    assert read_one(encode_frame(message), piece=1 << 20) == message


def test_error_messages_are_clipped() -> None:
    err = WireError("bad_request", "x" * 10_000_000)
    assert len(err.message) < MAX_ERROR_CHARS + 40
    assert "10000000 characters" in err.message


# -- tensors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tensor_round_trip_each_dtype(dtype: str) -> None:
    rng = np.random.default_rng(7)
    if dtype == "bool":
        array = rng.integers(0, 2, size=(2, 3, 4)).astype(bool)
    elif dtype.startswith("float"):
        array = rng.standard_normal((2, 3, 4)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(2, 3, 4), dtype=dtype, endpoint=True)
    encoded = encode_tensor(array)
    assert encoded == {"dtype": dtype, "shape": [2, 3, 4], "data": encoded["data"]}
    assert encoded["data"] == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = decode_tensor(encoded, "t")
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)
    # through a real CBOR frame as well
    frame = read_one(encode_frame({"t": encoded}))
    np.testing.assert_array_equal(decode_tensor(frame["t"], "t"), array)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from(sorted(DTYPES)).map(np.dtype),
                  shape=hnp.array_shapes(min_dims=0, max_dims=8, min_side=0, max_side=4)))
def test_tensor_round_trip_property(array: np.ndarray) -> None:
    decoded = decode_tensor(encode_tensor(array), "x")
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_arrays_go_out_little_endian() -> None:
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    encoded = encode_tensor(big)
    assert encoded["data"][:8] == struct.pack("<ff", 0.0, 1.0)
    np.testing.assert_array_equal(decode_tensor(encoded, "b"), big)
    assert tensors_digest({"x": big}) == tensors_digest({"x": big.astype("<f4")})


def test_non_contiguous_arrays_are_sent_in_c_order() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T
    np.testing.assert_array_equal(decode_tensor(encode_tensor(array), "t"), array)


@pytest.mark.parametrize("array", [np.zeros(2, dtype=np.complex64), np.array(["a", "b"]),
                                   np.array([object()], dtype=object)])
def test_unsendable_dtypes(array: np.ndarray) -> None:
    assert wire_error(encode_tensor, array).code == "bad_tensor"


GOOD = {"dtype": "float32", "shape": [2, 3], "data": bytes(24)}
BAD_TENSORS = {
    "not a map": [1, 2],
    "missing data": {"dtype": "float32", "shape": [2, 3]},
    "extra key": {**GOOD, "extra": 1},
    "bad dtype": {**GOOD, "dtype": "complex64"},
    "dtype object": {**GOOD, "dtype": "object"},
    "dtype not a string": {**GOOD, "dtype": 5},
    "big-endian dtype string": {**GOOD, "dtype": ">f4"},
    "short data": {**GOOD, "data": bytes(23)},
    "long data": {**GOOD, "data": bytes(25)},
    "data as text": {**GOOD, "data": "\x00" * 24},
    "data as list": {**GOOD, "data": [0] * 24},
    "negative dim": {**GOOD, "shape": [-2, -3]},
    "float dim": {**GOOD, "shape": [2.0, 3]},
    "bool dim": {**GOOD, "shape": [True, 3]},
    "string dim": {**GOOD, "shape": ["2", 3]},
    "shape not a list": {**GOOD, "shape": 6},
    "nine dims": {**GOOD, "shape": [1] * 9, "data": bytes(4)},
    "huge dim": {**GOOD, "shape": [2**31, 0], "data": b""},
    "int64 overflow, 8 dims": {**GOOD, "shape": [2**30] * 8, "data": b""},
    "int64 overflow, 4 dims": {**GOOD, "shape": [65536] * 4, "data": b""},
}


@pytest.mark.parametrize("obj", list(BAD_TENSORS.values()), ids=list(BAD_TENSORS))
def test_bad_tensors_are_refused_with_bad_tensor(obj: object) -> None:
    """Every malformed tensor is a WireError('bad_tensor'), never another exception type (which
    the node would report as an internal error)."""
    err = wire_error(decode_tensor, obj, "x")
    assert err.code == "bad_tensor"
    assert "'x'" in err.message


def test_good_tensor_edge_shapes() -> None:
    assert decode_tensor({"dtype": "int8", "shape": [], "data": b"\x05"}, "s") == 5
    assert decode_tensor({"dtype": "float32", "shape": [0, 7], "data": b""}, "e").shape == (0, 7)


def test_decode_tensors_wants_a_string_keyed_map() -> None:
    assert wire_error(decode_tensors, [GOOD], "'inputs'").code == "bad_request"
    assert wire_error(decode_tensors, {1: GOOD}, "'inputs'").code == "bad_request"
    assert wire_error(decode_tensors, None, "'inputs'").code == "bad_request"
    assert decode_tensors({}, "'inputs'") == {}
    out = decode_tensors({"a": GOOD}, "'inputs'")
    assert out["a"].shape == (2, 3)


# -- digests and receipts -------------------------------------------------------------------------

def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"hidden": rng.standard_normal((2, 5, 8)).astype(np.float32),
            "bias": rng.standard_normal((2, 1, 1, 5)).astype(np.float32),
            "ids": np.arange(10, dtype=np.int64).reshape(2, 5)}


def test_digest_is_deterministic_and_key_order_independent() -> None:
    t = _tensors()
    forward = tensors_digest(t)
    backward = tensors_digest(dict(reversed(list(t.items()))))
    assert forward == backward == tensors_digest(_tensors())
    assert len(forward) == 32
    # independent recomputation per docs/protocol.md: SHA-256 of the canonical CBOR of
    # [[name, dtype, shape, SHA-256(little-endian bytes)], ...] sorted by name, built from the
    # encoded wire form rather than from the arrays
    wire = encode_tensors(t)
    entries = [[name, wire[name]["dtype"], wire[name]["shape"],
                hashlib.sha256(wire[name]["data"]).digest()] for name in sorted(wire)]
    assert forward == hashlib.sha256(cbor2.dumps(entries, canonical=True)).digest()


def test_digest_survives_the_wire() -> None:
    t = _tensors()
    received = decode_tensors(read_one(encode_frame({"inputs": encode_tensors(t)}))["inputs"],
                              "'inputs'")
    assert tensors_digest(received) == tensors_digest(t)


def test_digest_changes_with_one_flipped_byte() -> None:
    t = _tensors()
    base = tensors_digest(t)
    for name in t:
        raw = bytearray(t[name].tobytes())
        for index in (0, len(raw) // 2, len(raw) - 1):
            flipped = bytearray(raw)
            flipped[index] ^= 0x01
            changed = dict(t)
            changed[name] = np.frombuffer(bytes(flipped), dtype=t[name].dtype).reshape(
                t[name].shape)
            assert tensors_digest(changed) != base, (name, index)


def test_digest_binds_names_dtypes_and_shapes() -> None:
    t = _tensors()
    base = tensors_digest(t)
    renamed = {("hidden2" if k == "hidden" else k): v for k, v in t.items()}
    reshaped = {**t, "hidden": t["hidden"].reshape(2, 8, 5)}          # same bytes
    retyped = {**t, "ids": t["ids"].view(np.float64)}                  # same bytes
    dropped = {k: v for k, v in t.items() if k != "bias"}
    for other in (renamed, reshaped, retyped, dropped):
        assert tensors_digest(other) != base


def test_receipt_payload_binds_every_field() -> None:
    d1, d2 = hashlib.sha256(b"in").digest(), hashlib.sha256(b"out").digest()
    args = ("req-1", "bafkreigxeiccchyf34cdtlf2kuxuwmebcpxxusgmzy2agja6paif2llkue", d1, d2)
    base = receipt_payload(*args)
    assert base == receipt_payload(*args)
    assert cbor2.loads(base) == [RECEIPT_DOMAIN, *args]
    variants = [
        ("req-2", args[1], d1, d2),
        (args[0], "bafkreibn7msn7tsmnio436i3gvfz37yodxkjc4r24eglalclvmki2sh64m", d1, d2),
        (args[0], args[1], hashlib.sha256(b"other").digest(), d2),
        (args[0], args[1], d1, hashlib.sha256(b"other").digest()),
        (args[0], args[1], d2, d1),  # digests swapped
    ]
    payloads = {receipt_payload(*v) for v in variants}
    assert base not in payloads
    assert len(payloads) == len(variants)


def test_error_message_shape() -> None:
    err = WireError("bad_frame", "nope")
    assert err.to_message("abc") == {"v": WIRE_VERSION, "id": "abc",
                                     "error": {"code": "bad_frame", "message": "nope"}}
    assert err.to_message()["id"] is None


@pytest.mark.parametrize("dtype", [[], {}, ["float32"]])
def test_unhashable_dtype_is_a_bad_tensor(dtype: object) -> None:
    """Found by tests/unit/fuzz/test_fuzz_wire.py: a list or map as dtype raised TypeError
    (unhashable) instead of WireError."""
    with pytest.raises(WireError) as info:
        decode_tensor({"dtype": dtype, "shape": [1], "data": b"\x00" * 4}, "x")
    assert info.value.code == "bad_tensor"
