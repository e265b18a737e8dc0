"""The veilnet wire format: length-prefixed CBOR frames carrying raw little-endian tensors.

A frame is an unsigned varint (the multiformats unsigned-varint, at most 9 bytes) giving the
length of a CBOR map that follows. Tensors are ``{"dtype": str, "shape": [int], "data": bytes}``.
Nothing is ever unpickled. Errors travel as ``{"v": 1, "id": ..., "error": {"code", "message"}}``.
See docs/protocol.md for the message schemas of each protocol.

The varint is written by hand (eight lines) because the multiformats varint packages work on
whole buffers, while a frame header must be read from a stream one byte at a time.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from typing import Any, Protocol

import cbor2
import numpy as np

WIRE_VERSION = 1
DEFAULT_FRAME_LIMIT = 64 * 1024 * 1024
MAX_VARINT_BYTES = 9  # multiformats unsigned-varint: at most 63 bits
RECEIPT_DOMAIN = "veilnet-infer-receipt/1"
FINGERPRINT_DOMAIN = "veilnet-fingerprint/1"

# dtypes a tensor may carry: fixed-size numeric types, always little-endian on the wire.
DTYPES = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
})


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


class WireError(Exception):
    """A protocol error with a stable ``code`` (see docs/protocol.md) and a readable message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_message(self, request_id: str | None = None) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "id": request_id,
                "error": {"code": self.code, "message": self.message}}


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


def decode_body(body: bytes) -> dict[str, Any]:
    """One CBOR map, nothing after it, no tags, at most 16 levels deep."""
    stream = io.BytesIO(body)
    try:
        message = cbor2.CBORDecoder(stream, max_depth=16, allow_duplicate_keys=False,
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


async def read_frame(stream: ByteStream, limit: int = DEFAULT_FRAME_LIMIT) -> dict[str, Any] | None:
    """Read one frame; None at a clean end of stream. Raises WireError on a bad frame."""
    length = await read_frame_length(stream)
    if length is None:
        return None
    if length > limit:
        raise WireError("frame_too_large", f"the frame has {length} bytes, the limit is {limit}")
    return decode_body(await read_exactly(stream, length))


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
    if dtype not in DTYPES:
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


def receipt_payload(request_id: str, shard_cid: str, input_digest: bytes,
                    output_digest: bytes) -> bytes:
    """The bytes a node signs for an inference response."""
    return cbor2.dumps([RECEIPT_DOMAIN, request_id, shard_cid, input_digest, output_digest],
                       canonical=True)


def fingerprint_payload(request_id: str, shard_cid: str, output_digest: bytes,
                        fingerprint: Mapping[str, Any]) -> bytes:
    """The bytes a node signs for the fingerprint of its outputs (consensus checks): the
    fingerprint is bound to the request and to the digest of the full outputs it summarizes."""
    fp_digest = hashlib.sha256(cbor2.dumps(dict(fingerprint), canonical=True)).digest()
    return cbor2.dumps([FINGERPRINT_DOMAIN, request_id, shard_cid, output_digest, fp_digest],
                       canonical=True)
