"""``/veilnet/session/1``: a node keeps a generation's KV cache between calls.

A decoder shard (its manifest has a ``kv_cache`` document) takes, beside its activations, one
``past`` tensor per cached key and value and returns the matching ``present`` tensors. In a
session the node holds those: the caller sends only the *non-cache* inputs (e.g.
``hidden_embed`` [batch, tokens, d]), first the prompt (``open``), then new tokens (``step``),
and gets the non-cache outputs back; ``close`` frees the cache. docs/protocol.md
("/veilnet/session/1") is the specification. Both halves of the protocol:

- the serving node: ``parse_request`` (an ``OpenRequest``, ``StepRequest`` or
  ``CloseRequest``), ``check_session_inputs`` (names, dtypes, ranks, fixed dimensions, one batch
  and token count, finite values), ``answer`` / ``close_answer``;
- the caller: the same request classes (``to_message()``), ``check_reply`` (id, op, shard and
  session echoed, position, outputs of the right names/dtypes/ranks and finite, output digest
  recomputed, signature verified with the PeerID's key) and ``check_close_reply``;
- both: ``session_io`` splits a node shard into its cache and non-cache tensors given the
  manifest's ``kv_cache`` document (``SessionIO``).

Every open and step answer is signed over the deterministic CBOR of
``["veilnet-session-step/1", id, shard CID, session, position_before, input_digest,
output_digest]`` (``step_payload``), where ``position_before`` is the cache length before the
call (0 for ``open``) and the digests are ``protocols.wire.tensors_digest`` of the non-cache
inputs and outputs: consecutive steps of one session chain by position.

Every non-cache input is ``[batch, tokens, ...]``; in the cache tensors ``kv_cache.layout``
names the ``batch`` and ``seq`` axes. Nothing here depends on the weights being plaintext (an
``ee-decoder/1`` node shard has the same tensor names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
import numpy as np
from libp2p.custom_types import TProtocol

from consensus.fingerprint import check_fingerprint, fingerprint
from crypto.identity import Identity, public_from_peer_id, verify
from errors import InputError
from models import ShardInputError, ShardSpec, TensorSpec, is_valid_cid
from models.runtime import check_inputs
from protocols.infer import (
    WANTS,
    check_fingerprint_shape,
    check_outputs,
    fingerprint_payload,
    non_finite,
)
from protocols.wire import (
    DigestEntry,
    WireError,
    decode_tensors,
    digest_entry,
    digest_of,
    encode_tensors,
    envelope,
    tensors_digest,
)

SESSION = TProtocol("/veilnet/session/1")
STEP_DOMAIN = "veilnet-session-step/1"
OPS = ("open", "step", "close")
SESSION_ID_HEX = 32  # a session id: 32 lowercase hex digits (128 random bits), chosen by the node
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
BATCH_AXIS, TOKEN_AXIS = 0, 1  # of every non-cache input and output


class KVCacheError(InputError):
    """A shard (or its manifest's ``kv_cache`` document) that cannot run in a session."""


def is_session_id(value: Any) -> bool:
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


# -- which tensors are the cache ------------------------------------------------------------------

@dataclass(frozen=True)
class SessionIO:
    """A node shard seen through a session: ``shard`` is its spec with only the non-cache
    inputs and outputs (what travels on the wire), ``cache`` the (past input, present output)
    name pairs the node keeps, ``past`` the specs of the past inputs."""

    shard: ShardSpec
    cache: tuple[tuple[str, str], ...]
    past: tuple[TensorSpec, ...]
    batch_axis: int  # of the cache tensors (kv_cache.layout's "batch")
    seq_axis: int  # of the cache tensors (kv_cache.layout's "seq")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.shard.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.shard.outputs

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The past tensors of a new session: length 0 on the seq axis, ``batch`` on the batch
        axis, the spec's fixed size elsewhere (e.g. [batch, kv_heads, 0, head_dim])."""
        out = {}
        for spec in self.past:
            shape = [batch if axis == self.batch_axis else 0 if axis == self.seq_axis else dim
                     for axis, dim in enumerate(spec.shape)]
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return out

    def split_outputs(self, outputs: Mapping[str, np.ndarray],
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(non-cache outputs, the next cache keyed by past name) from a shard run."""
        cache = {past: outputs[present] for past, present in self.cache}
        presents = {present for _, present in self.cache}
        return {k: v for k, v in outputs.items() if k not in presents}, cache

    def cache_length(self, cache: Mapping[str, np.ndarray]) -> int:
        """The tokens a cache holds (its seq axis); every cache tensor must agree."""
        lengths = {int(v.shape[self.seq_axis]) for v in cache.values()}
        if len(lengths) != 1:
            raise WireError("run_failed", f"the shard's cache tensors disagree on their length "
                                          f"({sorted(lengths)})")
        return lengths.pop()


def session_io(shard: ShardSpec, kv_cache: Mapping[str, Any] | None) -> SessionIO:
    """Split ``shard`` by its manifest's ``kv_cache`` document (``{"layout": [...], "past":
    [names], "present": [names]}``, ``past[k]`` paired with ``present[k]``). Only the pairs
    whose past is an input of this shard count; each needs its present among the outputs.
    Raises KVCacheError when the shard cannot run in a session."""
    where = f"shard {shard.cid}"
    if shard.role != "node":
        raise KVCacheError(f"{where} is a {shard.role} shard; sessions run node shards only")
    if not isinstance(kv_cache, Mapping):
        raise KVCacheError(f"{where}: its manifest has no kv_cache; use /veilnet/infer/1")
    layout, past, present = kv_cache.get("layout"), kv_cache.get("past"), kv_cache.get("present")
    if not (isinstance(layout, list) and all(isinstance(a, str) for a in layout)
            and "batch" in layout and "seq" in layout):
        raise KVCacheError(f"{where}: kv_cache.layout must list axis names with 'batch' and "
                           "'seq'")
    if not (isinstance(past, list) and isinstance(present, list) and len(past) == len(present)
            and all(isinstance(n, str) for n in past + present)):
        raise KVCacheError(f"{where}: kv_cache.past and kv_cache.present must be lists of "
                           "names of the same length")
    inputs = {t.name: t for t in shard.inputs}
    outputs = {t.name: t for t in shard.outputs}
    pairs = tuple((p, q) for p, q in zip(past, present, strict=True) if p in inputs)
    stray = sorted(q for p, q in zip(past, present, strict=True)
                   if q in outputs and p not in inputs)
    if not pairs:
        raise KVCacheError(f"{where} takes no cache tensor of its manifest's kv_cache")
    missing = sorted(q for _, q in pairs if q not in outputs)
    if missing or stray:
        raise KVCacheError(f"{where}: past and present tensors do not pair up (missing presents "
                           f"{missing}, presents without a past {stray})")
    batch_axis, seq_axis = layout.index("batch"), layout.index("seq")
    past_specs = tuple(inputs[p] for p, _ in pairs)
    for spec in past_specs:
        fixed = [d for axis, d in enumerate(spec.shape) if axis not in (batch_axis, seq_axis)]
        if len(spec.shape) != len(layout) or not all(isinstance(d, int) for d in fixed):
            raise KVCacheError(f"{where}: cache input {spec.name!r} {list(spec.shape)} does not "
                               f"fit the layout {layout} with fixed sizes")
    cached = set(inputs) - {p for p, _ in pairs}
    if not cached:
        raise KVCacheError(f"{where} has no input besides its cache")
    presents = {q for _, q in pairs}
    view = replace(shard, inputs=tuple(t for t in shard.inputs if t.name in cached),
                   outputs=tuple(t for t in shard.outputs if t.name not in presents))
    return SessionIO(view, pairs, past_specs, batch_axis, seq_axis)


def token_count(inputs: Mapping[str, np.ndarray]) -> int:
    """Tokens in a call: dimension 1 of the (non-cache) inputs (0 when there is none)."""
    dims = [int(np.shape(v)[TOKEN_AXIS]) for v in inputs.values() if np.ndim(v) > TOKEN_AXIS]
    return dims[0] if dims else 0


def check_session_inputs(io: SessionIO, inputs: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(batch, tokens) of a call's non-cache ``inputs``, checked against ``io``: names, dtypes,
    ranks and fixed dimensions as the manifest gives them, every input ``[batch, tokens, ...]``
    with one batch and one token count, both at least 1, and finite values (a NaN would poison
    the cache for the rest of the session). Raises WireError ``bad_inputs``."""
    try:
        check_inputs(io.shard, inputs)
    except ShardInputError as exc:
        raise WireError("bad_inputs", str(exc)) from None
    shapes = {name: value.shape for name, value in inputs.items()}
    if any(len(shape) <= TOKEN_AXIS for shape in shapes.values()):
        raise WireError("bad_inputs", f"session inputs are [batch, tokens, ...]; got {shapes}")
    sizes = {(s[BATCH_AXIS], s[TOKEN_AXIS]) for s in shapes.values()}
    if len(sizes) != 1:
        raise WireError("bad_inputs", f"the inputs disagree on batch or tokens: {shapes}")
    batch, tokens = sizes.pop()
    if batch < 1 or tokens < 1:
        raise WireError("bad_inputs", f"batch {batch} and tokens {tokens} must be at least 1")
    bad = non_finite(inputs)
    if bad:
        raise WireError("bad_inputs", f"non-finite inputs: {bad}")
    return int(batch), int(tokens)


# -- requests -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenRequest:
    """Start a session on ``shard`` with the prompt's non-cache ``inputs`` (prefill)."""

    id: str
    shard: str
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    want: str = "outputs"  # or "fingerprint" (a replica's check, as in /veilnet/infer/1)

    op = "open"

    def to_message(self) -> dict[str, Any]:
        return _with_want({**envelope(self.id), "op": "open", "shard": self.shard,
                           "inputs": encode_tensors(self.inputs)}, self.want)


@dataclass(frozen=True)
class StepRequest:
    """Run new tokens' non-cache ``inputs`` against session ``session``'s cache and append.
    ``position`` (optional): the cache length the caller expects before this step; the node
    refuses a step on a session at another position (``bad_position``), so a step retried after
    a lost answer is never appended twice."""

    id: str
    session: str
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    position: int | None = None
    want: str = "outputs"

    op = "step"

    def to_message(self) -> dict[str, Any]:
        message = {**envelope(self.id), "op": "step", "session": self.session,
                   "inputs": encode_tensors(self.inputs)}
        if self.position is not None:
            message["position"] = self.position
        return _with_want(message, self.want)


@dataclass(frozen=True)
class CloseRequest:
    """End session ``session`` and free its cache."""

    id: str
    session: str

    op = "close"

    def to_message(self) -> dict[str, Any]:
        return {**envelope(self.id), "op": "close", "session": self.session}


SessionRequest = OpenRequest | StepRequest | CloseRequest


def _with_want(message: dict[str, Any], want: str) -> dict[str, Any]:
    return message if want == "outputs" else {**message, "want": want}


def parse_request(message: Mapping[str, Any], request_id: str) -> SessionRequest:
    """The request in ``message`` (whose envelope was checked: ``request_id``); raises WireError
    ``bad_request`` (a missing or unknown ``op``, a bad field) or ``bad_tensor``."""
    op = message.get("op")
    if op not in OPS:
        what = "missing" if op is None else f"{str(op)[:40]!r}"
        raise WireError("bad_request", f"'op' is {what}: use \"open\", \"step\" or \"close\"")
    if op == "open":
        shard = message.get("shard")
        if not isinstance(shard, str) or not is_valid_cid(shard):
            raise WireError("bad_request", "'shard' must be a shard CID")
        return OpenRequest(request_id, shard, decode_tensors(message.get("inputs"), "'inputs'"),
                           _want(message))
    session = message.get("session")
    if not is_session_id(session):
        raise WireError("bad_request", f"'session' must be a session id ({SESSION_ID_HEX} "
                                       "lowercase hex digits)")
    if op == "close":
        return CloseRequest(request_id, session)
    position = message.get("position")
    if position is not None and (not isinstance(position, int) or isinstance(position, bool)
                                 or not 0 <= position < 1 << 31):
        raise WireError("bad_request", "'position' must be a non-negative integer")
    return StepRequest(request_id, session, decode_tensors(message.get("inputs"), "'inputs'"),
                       position, _want(message))


def _want(message: Mapping[str, Any]) -> str:
    want = message.get("want", "outputs")
    if want not in WANTS:
        raise WireError("bad_request", "'want' must be \"outputs\" or \"fingerprint\"")
    return str(want)


# -- answers (the serving node) -------------------------------------------------------------------

def step_payload(request_id: str, shard_cid: str, session: str, position_before: int,
                 input_digest: bytes, output_digest: bytes) -> bytes:
    """The bytes a node signs for an open or step answer."""
    return cbor2.dumps([STEP_DOMAIN, request_id, shard_cid, session, position_before,
                        input_digest, output_digest], canonical=True)


def answer(identity: Identity, request: OpenRequest | StepRequest, *, shard: str, session: str,
           position_before: int, position: int,
           outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The signed answer to an open or step ``request`` that ran on ``shard`` in ``session``,
    taking its cache from ``position_before`` to ``position`` tokens; ``outputs`` are the
    non-cache outputs."""
    input_digest, output_digest = tensors_digest(request.inputs), tensors_digest(outputs)
    response = {**envelope(request.id), "op": request.op, "shard": shard, "session": session,
                "position": position, "input_digest": input_digest,
                "output_digest": output_digest, "node": identity.did,
                "signature": identity.sign(step_payload(request.id, shard, session,
                                                        position_before, input_digest,
                                                        output_digest))}
    if request.want == "outputs":
        response["outputs"] = encode_tensors(outputs)
    else:
        fp = fingerprint(outputs)
        response["fingerprint"] = fp
        response["fingerprint_signature"] = identity.sign(
            fingerprint_payload(request.id, shard, output_digest, fp))
    return response


def close_answer(request: CloseRequest) -> dict[str, Any]:
    return {**envelope(request.id), "op": "close", "session": request.session, "closed": True}


# -- checking an answer (the caller) --------------------------------------------------------------

@dataclass(frozen=True)
class SessionReply:
    """An open or step answer that passed every check of ``check_reply``."""

    request_id: str
    op: str
    shard: str
    session: str
    position_before: int  # cache length before the call (0 for open)
    position: int  # cache length after it
    input_digest: bytes
    output_digest: bytes
    signature: bytes  # over step_payload(request_id, shard, session, position_before, ...)
    fingerprint: dict[str, Any]  # of the outputs: received, or computed here from them
    outputs: dict[str, np.ndarray] | None = None  # None when only the fingerprint was asked for
    out_entries: dict[str, DigestEntry] | None = None  # digest entries of ``outputs``
    fingerprint_signature: bytes | None = None

    def payload(self) -> bytes:
        """The signed bytes (for a receipt that chains the session's steps)."""
        return step_payload(self.request_id, self.shard, self.session, self.position_before,
                            self.input_digest, self.output_digest)


def check_reply(response: Mapping[str, Any], request: OpenRequest | StepRequest,
                input_digest: bytes, peer_id: str, shard: ShardSpec,
                session_outputs: Sequence[TensorSpec], *,
                position_before: int | None = None) -> SessionReply:
    """Check the answer of ``peer_id`` (the PeerID the stream reached over Noise) to an open or
    step ``request`` on node shard ``shard`` whose non-cache inputs have ``input_digest``;
    ``session_outputs`` are the non-cache outputs (``session_io(...).outputs``).

    The cache length before the call is 0 for ``open``; for a step it is ``position_before``,
    else ``request.position``, else taken from the answer; the answer's ``position`` must be
    that plus the request's tokens. Raises WireError ``bad_response`` or ``bad_signature``."""
    if response.get("id") != request.id or response.get("op") != request.op \
            or response.get("shard") != shard.cid \
            or (isinstance(request, OpenRequest) and request.shard != shard.cid):
        raise WireError("bad_response", "the answer is for another request, op or shard")
    session = response.get("session")
    if not is_session_id(session) or (isinstance(request, StepRequest)
                                      and session != request.session):
        raise WireError("bad_response", "the answer names another session")
    if response.get("input_digest") != input_digest:
        raise WireError("bad_response", "the node signed a different input digest")
    position, tokens = response.get("position"), token_count(request.inputs)
    if not isinstance(position, int) or isinstance(position, bool) or position < tokens:
        raise WireError("bad_response", "'position' must be an integer of at least the tokens "
                                        "sent")
    if isinstance(request, OpenRequest):
        before = 0
    elif position_before is not None:
        before = position_before
    else:
        before = request.position if request.position is not None else position - tokens
    if position != before + tokens:
        raise WireError("bad_response", f"the session is at position {position}, expected "
                                        f"{before} + {tokens} tokens")
    spec = replace(shard, outputs=tuple(session_outputs))
    public = public_from_peer_id(peer_id)
    outputs = out_entries = fp_signature = None
    if request.want == "outputs":
        outputs = decode_tensors(response.get("outputs"), "'outputs'")
        check_outputs(spec, outputs)
        _check_shapes(spec, {n: list(v.shape) for n, v in outputs.items()}, request.inputs)
        out_entries = {n: digest_entry(n, v) for n, v in outputs.items()}
        output_digest = digest_of(out_entries)
        if response.get("output_digest") != output_digest:
            raise WireError("bad_response", "the output digest does not match the outputs")
        fp = fingerprint(outputs)
    else:
        output_digest = response.get("output_digest")
        if not isinstance(output_digest, bytes) or len(output_digest) != 32:
            raise WireError("bad_response", "'output_digest' must be 32 bytes")
        try:
            fp = check_fingerprint(response.get("fingerprint"))
        except ValueError as exc:
            raise WireError("bad_response", f"bad fingerprint: {exc}") from None
        check_fingerprint_shape(spec, fp)
        _check_shapes(spec, {n: list(t["shape"]) for n, t in fp["tensors"].items()},
                      request.inputs)
        fp_signature = response.get("fingerprint_signature")
        if not isinstance(fp_signature, bytes) or not verify(
                public, fp_signature, fingerprint_payload(request.id, shard.cid, output_digest,
                                                          fp)):
            raise WireError("bad_signature", "the fingerprint signature does not verify")
    signature = response.get("signature")
    if not isinstance(signature, bytes) or not verify(public, signature, step_payload(
            request.id, shard.cid, session, before, input_digest, output_digest)):
        raise WireError("bad_signature", "the node's signature does not verify")
    return SessionReply(request.id, request.op, shard.cid, session, before, position,
                        input_digest, output_digest, signature, fp, outputs, out_entries,
                        fp_signature)


def _check_shapes(spec: ShardSpec, shapes: Mapping[str, list[int]],
                  inputs: Mapping[str, np.ndarray]) -> None:
    """Outputs of the manifest's fixed sizes, each [batch, tokens, ...] of the request's."""
    first = next((np.shape(v) for v in inputs.values() if np.ndim(v) > TOKEN_AXIS), None)
    for t in spec.outputs:
        shape = shapes[t.name]
        fixed = all(not isinstance(d, int) or d == got for d, got in zip(t.shape, shape,
                                                                          strict=True))
        if not fixed or (first is not None and len(shape) > TOKEN_AXIS
                         and tuple(shape[:TOKEN_AXIS + 1]) != tuple(first[:TOKEN_AXIS + 1])):
            raise WireError("bad_response", f"output {t.name!r} has shape {shape}; expected "
                                            f"{list(t.shape)} for inputs of {list(first or ())}")


def check_close_reply(response: Mapping[str, Any], request: CloseRequest) -> None:
    """Check the answer to a close request; raises WireError ``bad_response``."""
    if response.get("id") != request.id or response.get("op") != "close" \
            or response.get("session") != request.session or response.get("closed") is not True:
        raise WireError("bad_response", "not an answer to this close request")


__all__ = [
    "BATCH_AXIS", "OPS", "SESSION", "SESSION_ID_HEX", "STEP_DOMAIN", "TOKEN_AXIS",
    "CloseRequest", "KVCacheError", "OpenRequest", "SessionIO", "SessionReply", "SessionRequest",
    "StepRequest", "answer", "check_close_reply", "check_reply", "check_session_inputs",
    "close_answer", "is_session_id", "parse_request", "session_io", "step_payload", "token_count",
]
