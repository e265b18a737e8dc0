"""The veilnet frame codec: length-prefixed CBOR frames carrying raw little-endian tensors.

A frame is an unsigned varint (the multiformats unsigned-varint, at most 9 bytes) giving the
length of a CBOR map that follows. Tensors are ``{"dtype": str, "shape": [int], "data": bytes}``.
Nothing is ever unpickled. Errors travel as ``{"v": 1, "id": ..., "error": {"code", "message"}}``.
The messages of each protocol live in their own module of this package (protocols/infer.py,
protocols/shard.py, ...); docs/protocol.md is the specification.

The varint is written by hand (eight lines) because the multiformats varint packages work on
whole buffers, while a frame header must be read from a stream one byte at a time.

A body is bounded before cbor2 turns it into Python objects: at most ``MAX_FRAME_ITEMS`` data
items, ``MAX_DEPTH`` levels, a map at the top, no tags, no indefinite lengths (``scan_items``).
cbor2 (6.3) has a depth limit but no item limit, and one byte of CBOR (an empty array) becomes
about 64 bytes of Python objects, so without the count a 16 MiB frame cost a node 1.2 GB.
``decode_frame_body`` runs a body of more than ``THREAD_DECODE_BYTES`` in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from typing import Any, Protocol

import cbor2
import numpy as np
import trio

from errors import ProtocolError

WIRE_VERSION = 1
DEFAULT_FRAME_LIMIT = 64 * 1024 * 1024
MAX_VARINT_BYTES = 9  # multiformats unsigned-varint: at most 63 bits
MAX_DEPTH = 16  # nested non-empty maps/arrays, counted as cbor2's max_depth counts them
# Data items in one frame (every map key, map value, array element and the top map count one).
# The largest legitimate messages hold a few hundred to a few tens of thousands: a fingerprint
# has about 20 per tensor (at most 64 tensors), a card lookup at most 256 strings, a peers
# response at most 128 records of at most 8 addresses and 256 shard CIDs (about 36k); tensors
# are byte strings, one item each. At this limit decoded objects take at most a few MB.
MAX_FRAME_ITEMS = 1 << 16
THREAD_DECODE_BYTES = 1 << 20  # bigger bodies are scanned and decoded off the event loop
MAX_ERROR_CHARS = 1024  # an error message is cut to this (it is sent, logged and counted)
MAX_ID_LENGTH = 128  # a request id: a string of at most this many characters

# dtypes a tensor may carry: fixed-size numeric types, always little-endian on the wire.
DTYPES = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
})


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


class WireError(ProtocolError):
    """A protocol error with a stable ``code`` (see docs/protocol.md) and a readable message."""

    def __init__(self, code: str, message: str) -> None:
        if len(message) > MAX_ERROR_CHARS:  # messages may quote what a peer sent
            message = f"{message[:MAX_ERROR_CHARS]}... ({len(message)} characters)"
        super().__init__(code, message)

    def to_message(self, request_id: str | None = None) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "id": request_id,
                "error": {"code": self.code, "message": self.message}}


def envelope(request_id: str | None) -> dict[str, Any]:
    """The fields every message starts with: the wire version and the request id."""
    return {"v": WIRE_VERSION, "id": request_id}


def request_id_of(message: Mapping[str, Any]) -> str | None:
    """The message's ``id`` when it is a valid request id (echoed in an error), else None."""
    raw = message.get("id")
    return raw if isinstance(raw, str) and len(raw) <= MAX_ID_LENGTH else None


def check_envelope(message: Mapping[str, Any]) -> str:
    """The request id of an incoming request; raises WireError (``unsupported_version``,
    ``bad_request``) when the version or the id is wrong."""
    if message.get("v") != WIRE_VERSION:
        raise WireError("unsupported_version", f"wire version {message.get('v')!r}; this node "
                                               f"speaks {WIRE_VERSION}")
    request_id = request_id_of(message)
    if request_id is None:
        raise WireError("bad_request", f"'id' must be a string of at most {MAX_ID_LENGTH} "
                                       "characters")
    return request_id


# -- frames -------------------------------------------------------------------------------------

def encode_varint(n: int) -> bytes:
    if n < 0 or n >= 1 << 63:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = cbor2.dumps(dict(message))
    return encode_varint(len(body)) + body


async def write_frame(stream: ByteStream, message: Mapping[str, Any]) -> None:
    await stream.write(encode_frame(message))


async def _read(stream: ByteStream, n: int) -> bytes:
    try:
        return await stream.read(n)
    except EOFError:  # py-libp2p raises StreamEOF (an EOFError) where files return b""
        return b""


async def read_exactly(stream: ByteStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await _read(stream, n - len(buf))
        if not chunk:
            raise WireError("truncated", f"the stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame_length(stream: ByteStream) -> int | None:
    """The next frame's length, or None at a clean end of stream (before any header byte)."""
    value = shift = 0
    for i in range(MAX_VARINT_BYTES):
        chunk = await _read(stream, 1)
        if not chunk:
            if i == 0:
                return None
            raise WireError("truncated", "the stream ended inside a frame header")
        byte = chunk[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if i > 0 and byte == 0:
                raise WireError("bad_frame", "the frame header is not a minimal varint")
            return value
        shift += 7
    raise WireError("bad_frame", f"the frame header is longer than {MAX_VARINT_BYTES} bytes")


def scan_items(body: bytes, max_items: int = MAX_FRAME_ITEMS,
               max_depth: int = MAX_DEPTH) -> int:
    """Check the item headers of one CBOR body without building any object; return the number
    of data items. Raises WireError(bad_frame) unless ``body`` is exactly one CBOR map with at
    most ``max_items`` items, ``max_depth`` levels, no tags and no indefinite lengths.

    Linear in the number of items (string payloads are skipped by their length), and stops at
    the first item over the limit. Hand-written because cbor2, the only maintained CBOR package
    here, has no item limit and no way to walk headers without decoding.
    """
    size = len(body)
    if not size or body[0] >> 5 != 5:
        raise WireError("bad_frame", "a frame must be a CBOR map")
    pos = items = 0
    pending = [1]  # items still to read in each open container; the sentinel is the top level
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= size:
            raise WireError("bad_frame", "the frame is not valid CBOR (it ends inside an item)")
        initial = body[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            arg = int.from_bytes(body[pos:pos + width], "big")
            pos += width
        elif info == 31:
            raise WireError("bad_frame", "indefinite-length CBOR items are not allowed")
        else:
            raise WireError("bad_frame", f"reserved CBOR header byte 0x{initial:02x}")
        items += 1
        if items > max_items:
            raise WireError("bad_frame", f"the frame holds more than {max_items} CBOR items")
        if major in (2, 3):  # byte and text strings: skip the payload
            pos += arg
        elif major in (4, 5):  # arrays and maps: each member is at least one more byte
            members = arg if major == 4 else 2 * arg
            if members > size - pos:
                raise WireError("bad_frame", f"a CBOR container declares {members} items, "
                                             f"more than the {size - pos} bytes left")
            if members:
                if len(pending) > max_depth:
                    raise WireError("bad_frame", f"the frame nests deeper than {max_depth} "
                                                 "levels")
                pending.append(members)
        elif major == 6:
            raise WireError("bad_frame", f"CBOR tag {arg} is not allowed")
    if pos > size:
        raise WireError("bad_frame", "the frame is not valid CBOR (it ends inside an item)")
    if pos != size:
        raise WireError("bad_frame", f"{size - pos} bytes follow the CBOR map")
    return items


def decode_body(body: bytes) -> dict[str, Any]:
    """One CBOR map, nothing after it, no tags, at most ``MAX_DEPTH`` levels deep and
    ``MAX_FRAME_ITEMS`` data items. Runs on the calling thread: see ``decode_frame_body``."""
    if len(body) > MAX_FRAME_ITEMS:  # a shorter body cannot hold more items than it has bytes
        scan_items(body)
    stream = io.BytesIO(body)
    try:
        message = cbor2.CBORDecoder(stream, max_depth=MAX_DEPTH, allow_duplicate_keys=False,
                                    allow_indefinite=False, strict_hashable_types=True,
                                    tag_hook=_reject_tag, semantic_decoders=_REJECT_TAGS,
                                    read_size=1).decode()
    except WireError:
        raise
    except Exception as exc:  # cbor2 raises several types on garbage; all mean the same here
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, WireError):  # a rejected tag, wrapped by cbor2
            raise cause from None
        raise WireError("bad_frame", f"the frame is not valid CBOR ({exc})") from None
    if stream.tell() != len(body):
        raise WireError("bad_frame", f"{len(body) - stream.tell()} bytes follow the CBOR map")
    if not isinstance(message, dict):
        raise WireError("bad_frame", f"a frame must be a CBOR map, got {type(message).__name__}")
    return message


async def decode_frame_body(body: bytes) -> dict[str, Any]:
    """``decode_body``, in a worker thread for a body over ``THREAD_DECODE_BYTES`` so that the
    event loop keeps serving other streams meanwhile."""
    if len(body) <= THREAD_DECODE_BYTES:
        return decode_body(body)
    return await trio.to_thread.run_sync(decode_body, body)


async def read_frame(stream: ByteStream, limit: int = DEFAULT_FRAME_LIMIT) -> dict[str, Any] | None:
    """Read one frame; None at a clean end of stream. Raises WireError on a bad frame."""
    length = await read_frame_length(stream)
    if length is None:
        return None
    if length > limit:
        raise WireError("frame_too_large", f"the frame has {length} bytes, the limit is {limit}")
    return await decode_frame_body(await read_exactly(stream, length))


def _reject_tag(decoder: Any, tag: Any) -> Any:
    raise WireError("bad_frame", f"CBOR tag {tag.tag} is not allowed")


def _rejecter(number: int) -> Any:
    def reject(decoder: Any) -> Any:
        raise WireError("bad_frame", f"CBOR tag {number} is not allowed")
    return reject


# cbor2 decodes the tags it knows (datetimes, bignums, sets, shared references, regexes, ...)
# before tag_hook sees them; overriding every low tag number turns them into errors too.
_REJECT_TAGS = {n: _rejecter(n) for n in (*range(0, 1024), 1004, 1040, 55799)}


# -- tensors ------------------------------------------------------------------------------------

def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    if array.dtype.name not in DTYPES:
        raise WireError("bad_tensor", f"dtype {array.dtype.name} cannot be sent")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": np.ascontiguousarray(little).tobytes()}


def decode_tensor(obj: Any, name: str) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise WireError("bad_tensor", f"tensor {name!r} must be a map of dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or map is unhashable
        raise WireError("bad_tensor", f"tensor {name!r}: unsupported dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31
                       for d in shape)):
        raise WireError("bad_tensor", f"tensor {name!r}: shape must be a list of at most 8 "
                                      "non-negative integers")
    if not isinstance(data, bytes):
        raise WireError("bad_tensor", f"tensor {name!r}: data must be a byte string")
    dt = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow
    if expected != len(data):
        raise WireError("bad_tensor", f"tensor {name!r}: shape {shape} of {dtype} needs "
                                      f"{expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: encode_tensor(np.asarray(value)) for name, value in tensors.items()}


def decode_tensors(obj: Any, what: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise WireError("bad_request", f"{what} must be a map from tensor names to tensors")
    return {name: decode_tensor(value, name) for name, value in obj.items()}


DigestEntry = list  # [name, dtype, shape, SHA-256 of the little-endian bytes]


def digest_entry(name: str, array: np.ndarray) -> DigestEntry:
    array = np.asarray(array)
    little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    data = little.view(np.uint8) if little.ndim else little.tobytes()
    return [name, array.dtype.name, list(array.shape), hashlib.sha256(data).digest()]


def digest_of(entries: Mapping[str, DigestEntry]) -> bytes:
    return hashlib.sha256(cbor2.dumps([entries[n] for n in sorted(entries)],
                                      canonical=True)).digest()


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of the deterministic CBOR (RFC 8949 §4.2) of
    ``[[name, dtype, shape, SHA-256(data)], ...]`` with the names in sorted order.

    Hashing each tensor's little-endian bytes in place, rather than a CBOR encoding of the whole
    map, saves a copy of every activation on both ends of every hop; and a tensor's entry can be
    reused when the same tensor goes into the next hop (``digest_entry``/``digest_of``).
    """
    return digest_of({name: digest_entry(name, value) for name, value in tensors.items()})
