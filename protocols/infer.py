"""``/veilnet/infer/1``: a node runs one shard on a client's activations and signs the result.

Both halves of the protocol (docs/protocol.md, "/veilnet/infer/1"):

- the serving node parses a request (``parse_request``: an ``InferRequest`` for EE or plain
  tensors, a ``CkksRequest`` for CKKS ciphertexts) and builds the signed response
  (``answer``, ``ckks_answer``);
- the caller checks a response (``check_reply``, ``check_ckks_reply``): request id and shard
  echoed, input digest, outputs of the shard's names, dtypes and ranks and finite values (or a
  valid fingerprint of them), output digest recomputed, and the receipt signature (and the
  fingerprint signature) verified with the public key of the PeerID that answered. Anything
  wrong raises ``WireError`` (``bad_response``, ``bad_signature``).

A response is signed over the deterministic CBOR of
``["veilnet-infer-receipt/1", id, shard CID, input digest, output digest]``
(``receipt_payload``), so anyone holding it can check later what the node claimed to compute.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np
from libp2p.custom_types import TProtocol

from consensus.fingerprint import check_fingerprint, fingerprint
from crypto.identity import Identity, public_from_peer_id, verify
from crypto.masks import SEED_BYTES, expand_mask
from models import ShardSpec, is_valid_cid
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

INFER = TProtocol("/veilnet/infer/1")
RECEIPT_DOMAIN = "veilnet-infer-receipt/1"
FINGERPRINT_DOMAIN = "veilnet-fingerprint/1"
WANTS = ("outputs", "fingerprint")  # what a request asks back: the tensors, or a fingerprint
# how the inputs travel: tensors (EE, masked or plain), CKKS ciphertexts, or seeds of masks the
# node draws itself (masked/1: the node that computes r W never sees x + r)
MASK_SEED = "mask-seed"
ENCRYPTIONS = ("ee", "ckks", MASK_SEED)
MAX_CIPHERTEXTS = 1024  # CKKS vectors in one request (one per input feature)
MAX_SEEDED_VALUES = 16 * 1024 * 1024  # values one mask-seed request may expand to (128 MB)
SEEDS_DOMAIN = "veilnet-mask-seeds/1"


def receipt_payload(request_id: str, shard_cid: str, input_digest: bytes,
                    output_digest: bytes) -> bytes:
    """The bytes a node signs for an inference response."""
    return cbor2.dumps([RECEIPT_DOMAIN, request_id, shard_cid, input_digest, output_digest],
                       canonical=True)


def fingerprint_payload(request_id: str, shard_cid: str, output_digest: bytes,
                        fp: Mapping[str, Any]) -> bytes:
    """The bytes a node signs for the fingerprint of its outputs (consensus checks): the
    fingerprint is bound to the request and to the digest of the full outputs it summarizes."""
    fp_digest = hashlib.sha256(cbor2.dumps(dict(fp), canonical=True)).digest()
    return cbor2.dumps([FINGERPRINT_DOMAIN, request_id, shard_cid, output_digest, fp_digest],
                       canonical=True)


def ciphertexts_digest(context: bytes, ciphertexts: Sequence[bytes]) -> bytes:
    """The digest of a CKKS request's or response's ciphertexts: SHA-256 over dCBOR
    ``[SHA-256(context), [SHA-256(ciphertext), ...]]``. Here, not in crypto/ckks.py, so that
    checking a CKKS response does not load TenSEAL."""
    return hashlib.sha256(cbor2.dumps(
        [hashlib.sha256(context).digest(), [hashlib.sha256(c).digest() for c in ciphertexts]],
        canonical=True)).digest()


# -- requests -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskSeed:
    """An input the node draws itself: the ``veilnet-mask/1`` Gaussian of ``shape`` and scale
    ``sigma`` from ``seed`` (crypto/masks.py)."""

    seed: bytes
    shape: tuple[int, ...]
    sigma: float

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "shape": list(self.shape), "sigma": float(self.sigma)}

    def expand(self) -> np.ndarray:
        return expand_mask(self.seed, self.shape, self.sigma)


@dataclass(frozen=True)
class InferRequest:
    """Run ``shard`` on ``inputs``; answer with the outputs or (``want="fingerprint"``) only a
    signed fingerprint of them. A ``mask-seed`` request carries ``seeds`` instead of inputs:
    the node expands them (``expanded``) and runs the shard on the masks."""

    id: str
    shard: str
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    want: str = "outputs"
    seeds: Mapping[str, MaskSeed] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {**envelope(self.id), "shard": self.shard}
        if self.seeds:
            message["encryption"] = MASK_SEED
            message["seeds"] = {name: s.to_json() for name, s in self.seeds.items()}
        else:
            message["inputs"] = encode_tensors(self.inputs)
        if self.want != "outputs":
            message["want"] = self.want
        return message

    def input_digest(self) -> bytes:
        """What the response's receipt signs as the input: the tensors' digest, or for a
        mask-seed request ``seeds_digest`` (the seeds fix the masks; hashing megabytes of
        masks on both sides would only cost time)."""
        return seeds_digest(self.seeds) if self.seeds else tensors_digest(self.inputs)

    def expanded(self) -> InferRequest:
        """This request with its seeds drawn into ``inputs`` (CPU work: call it in a worker
        thread); the response's input digest is over those tensors."""
        if not self.seeds:
            return self
        inputs = {name: s.expand() for name, s in self.seeds.items()}
        return InferRequest(self.id, self.shard, inputs, self.want, self.seeds)


def seeds_digest(seeds: Mapping[str, MaskSeed]) -> bytes:
    """SHA-256 over dCBOR ``["veilnet-mask-seeds/1", [[name, seed, shape, sigma], ...]]`` by
    name: the input digest of a mask-seed request."""
    rows = [[name, s.seed, list(s.shape), float(s.sigma)] for name, s in sorted(seeds.items())]
    return hashlib.sha256(cbor2.dumps([SEEDS_DOMAIN, rows], canonical=True)).digest()


def _parse_seeds(doc: Any) -> dict[str, MaskSeed]:
    if not isinstance(doc, dict) or not doc:
        raise WireError("bad_request", "'seeds' must be a non-empty map of input name to "
                                       "{seed, shape, sigma}")
    seeds, total = {}, 0
    for name, spec in doc.items():
        where = f"seed for {name!r}" if isinstance(name, str) else "a seed"
        if not isinstance(name, str) or not name or not isinstance(spec, dict):
            raise WireError("bad_request", f"{where}: must map an input name to "
                                           "{seed, shape, sigma}")
        seed, shape, sigma = spec.get("seed"), spec.get("shape"), spec.get("sigma")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise WireError("bad_request", f"{where}: 'seed' must be {SEED_BYTES} bytes")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise WireError("bad_request", f"{where}: 'shape' must be a list of 1 to 8 "
                                           "non-negative integers")
        if isinstance(sigma, bool) or not isinstance(sigma, float | int) \
                or not math.isfinite(sigma) or sigma <= 0:
            raise WireError("bad_request", f"{where}: 'sigma' must be a positive finite number")
        total += math.prod(shape)
        if total > MAX_SEEDED_VALUES:
            raise WireError("bad_request", f"the seeds expand to more than {MAX_SEEDED_VALUES} "
                                           "values")
        seeds[name] = MaskSeed(seed, tuple(shape), float(sigma))
    return seeds


@dataclass(frozen=True)
class CkksRequest:
    """Evaluate ``shard`` on CKKS ``ciphertexts`` (one per input feature) under the public
    TenSEAL ``context`` (the client keeps the secret key)."""

    id: str
    shard: str
    context: bytes
    ciphertexts: list[bytes]

    def to_message(self) -> dict[str, Any]:
        return {**envelope(self.id), "shard": self.shard, "encryption": "ckks",
                "context": self.context, "ciphertexts": list(self.ciphertexts)}


def parse_request(message: Mapping[str, Any], request_id: str) -> InferRequest | CkksRequest:
    """The request in ``message`` (whose envelope was checked: ``request_id``); raises WireError
    ``bad_request`` or ``bad_tensor`` naming what is wrong."""
    shard = message.get("shard")
    if not isinstance(shard, str) or not is_valid_cid(shard):
        raise WireError("bad_request", "'shard' must be a shard CID")
    encryption = message.get("encryption", "ee")
    if encryption not in ENCRYPTIONS:
        raise WireError("bad_request", f"'encryption' {encryption!r}: \"ee\" (default), "
                                       f"\"ckks\" or \"{MASK_SEED}\"")
    if encryption == "ckks":
        context, ciphertexts = message.get("context"), message.get("ciphertexts")
        if not isinstance(ciphertexts, list) or not 1 <= len(ciphertexts) <= MAX_CIPHERTEXTS \
                or not all(isinstance(c, bytes) for c in ciphertexts):
            raise WireError("bad_request", f"'ciphertexts' must be a list of 1 to "
                                           f"{MAX_CIPHERTEXTS} serialized CKKS vectors")
        if not isinstance(context, bytes):
            raise WireError("bad_request", "'context' must be the serialized public TenSEAL "
                                           "context")
        return CkksRequest(request_id, shard, context, ciphertexts)
    want = message.get("want", "outputs")
    if want not in WANTS:
        raise WireError("bad_request", "'want' must be \"outputs\" or \"fingerprint\"")
    if encryption == MASK_SEED:
        if "inputs" in message:
            raise WireError("bad_request", "a mask-seed request carries 'seeds', not 'inputs'")
        return InferRequest(request_id, shard, {}, want, _parse_seeds(message.get("seeds")))
    return InferRequest(request_id, shard, decode_tensors(message.get("inputs"), "'inputs'"),
                        want)


# -- responses (the serving node) -----------------------------------------------------------------

def _signed(identity: Identity, request_id: str, shard: str, input_digest: bytes,
            output_digest: bytes) -> dict[str, Any]:
    return {"input_digest": input_digest, "output_digest": output_digest,
            "node": identity.did,
            "signature": identity.sign(receipt_payload(request_id, shard, input_digest,
                                                       output_digest))}


def answer(identity: Identity, request: InferRequest,
           outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The signed response to ``request`` for the shard's ``outputs``."""
    output_digest = tensors_digest(outputs)
    response = {**envelope(request.id), "shard": request.shard,
                **_signed(identity, request.id, request.shard, request.input_digest(),
                          output_digest)}
    if request.want == "outputs":
        response["outputs"] = encode_tensors(outputs)
    else:  # a replica's check: the fingerprint instead of the tensors (consensus checks)
        fp = fingerprint(outputs)
        response["fingerprint"] = fp
        response["fingerprint_signature"] = identity.sign(
            fingerprint_payload(request.id, request.shard, output_digest, fp))
    return response


def ckks_answer(identity: Identity, request: CkksRequest,
                outputs: list[bytes]) -> dict[str, Any]:
    """The signed response to a CKKS request: one output ciphertext per output feature; the
    digests are ``crypto.ckks.ciphertexts_digest`` over the context and the ciphertexts."""
    return {**envelope(request.id), "shard": request.shard, "encryption": "ckks",
            "ciphertexts": outputs,
            **_signed(identity, request.id, request.shard,
                      ciphertexts_digest(request.context, request.ciphertexts),
                      ciphertexts_digest(request.context, outputs))}


# -- checking a response (the caller) -------------------------------------------------------------

@dataclass(frozen=True)
class InferReply:
    """A response that passed every check of ``check_reply``."""

    request_id: str
    shard: str
    input_digest: bytes
    output_digest: bytes
    signature: bytes
    received_fingerprint: dict[str, Any] | None  # the node's, when it sent only a fingerprint
    outputs: dict[str, np.ndarray] | None = None  # None when only the fingerprint was asked for
    out_entries: dict[str, DigestEntry] | None = None  # digest entries of ``outputs``
    fingerprint_signature: bytes | None = None

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """The outputs' fingerprint: received, or computed from the outputs on first use (it
        sorts every row: only verdicts among replicas need it, masked/1 and verify=none
        never do)."""
        if self.received_fingerprint is not None:
            return self.received_fingerprint
        return fingerprint(self.outputs or {})


def _check_echo(response: Mapping[str, Any], request_id: str, shard: str,
                input_digest: bytes) -> None:
    if response.get("id") != request_id or response.get("shard") != shard:
        raise WireError("bad_response", "the response is for another request or shard")
    if response.get("input_digest") != input_digest:
        raise WireError("bad_response", "the node signed a different input digest")


def _check_signature(response: Mapping[str, Any], request_id: str, shard: str,
                     input_digest: bytes, output_digest: bytes, public: Any) -> bytes:
    signature = response.get("signature")
    payload = receipt_payload(request_id, shard, input_digest, output_digest)
    if not isinstance(signature, bytes) or not verify(public, signature, payload):
        raise WireError("bad_signature", "the node's signature does not verify")
    return signature


def check_reply(response: Mapping[str, Any], request: InferRequest, input_digest: bytes,
                peer_id: str, shard: ShardSpec) -> InferReply:
    """Check the response of ``peer_id`` (the PeerID the stream reached over Noise) to
    ``request`` for ``shard``, whose inputs have ``input_digest``; raises WireError."""
    _check_echo(response, request.id, request.shard, input_digest)
    public = public_from_peer_id(peer_id)
    if request.want == "outputs":
        outputs = decode_tensors(response.get("outputs"), "'outputs'")
        check_outputs(shard, outputs)
        out_entries = {n: digest_entry(n, v) for n, v in outputs.items()}
        output_digest = digest_of(out_entries)
        if response.get("output_digest") != output_digest:
            raise WireError("bad_response", "the output digest does not match the outputs")
        signature = _check_signature(response, request.id, request.shard, input_digest,
                                     output_digest, public)
        return InferReply(request.id, request.shard, input_digest, output_digest, signature,
                          None, outputs, out_entries)
    output_digest = response.get("output_digest")
    fp_signature = response.get("fingerprint_signature")
    try:
        fp = check_fingerprint(response.get("fingerprint"))
    except ValueError as exc:
        raise WireError("bad_response", f"bad fingerprint: {exc}") from None
    check_fingerprint_shape(shard, fp)
    if not isinstance(output_digest, bytes) or len(output_digest) != 32:
        raise WireError("bad_response", "'output_digest' must be 32 bytes")
    if not isinstance(fp_signature, bytes) or not verify(
            public, fp_signature,
            fingerprint_payload(request.id, request.shard, output_digest, fp)):
        raise WireError("bad_signature", "the fingerprint signature does not verify")
    signature = _check_signature(response, request.id, request.shard, input_digest,
                                 output_digest, public)
    return InferReply(request.id, request.shard, input_digest, output_digest, signature, fp,
                      fingerprint_signature=fp_signature)


def check_ckks_reply(response: Mapping[str, Any], request: CkksRequest,
                     peer_id: str) -> tuple[list[bytes], InferReply]:
    """Check a node's response to a CKKS request: the output ciphertexts and the checked
    reply (digests and signature); raises WireError."""
    input_digest = ciphertexts_digest(request.context, request.ciphertexts)
    _check_echo(response, request.id, request.shard, input_digest)
    outputs = response.get("ciphertexts")
    if not isinstance(outputs, list) or not all(isinstance(c, bytes) for c in outputs):
        raise WireError("bad_response", "'ciphertexts' must be a list of bytes")
    output_digest = ciphertexts_digest(request.context, outputs)
    if response.get("output_digest") != output_digest:
        raise WireError("bad_response", "the output digest does not match the ciphertexts")
    signature = _check_signature(response, request.id, request.shard, input_digest,
                                 output_digest, public_from_peer_id(peer_id))
    return outputs, InferReply(request.id, request.shard, input_digest, output_digest,
                               signature, {})


def check_outputs(shard: ShardSpec, outputs: Mapping[str, np.ndarray]) -> None:
    """Names, dtypes, ranks and finiteness of a node's outputs for ``shard``. A NaN or an
    infinity is never a legitimate activation of an encrypted shard, and it would poison every
    later step (with ``verify="none"`` nothing else would catch it)."""
    expected = {t.name: t for t in shard.outputs}
    if set(outputs) != set(expected):
        raise WireError("bad_response", f"outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, spec in expected.items():
        value = outputs[name]
        if value.dtype.name != spec.dtype or value.ndim != len(spec.shape):
            raise WireError("bad_response", f"output {name!r} is {value.dtype.name} rank "
                                            f"{value.ndim}, expected {spec.dtype} rank "
                                            f"{len(spec.shape)}")
    bad = non_finite(outputs)
    if bad:
        raise WireError("bad_response", f"non-finite outputs: {bad}")


def check_fingerprint_shape(shard: ShardSpec, fp: dict[str, Any]) -> None:
    """A (validated) fingerprint of the shard's outputs, with finite values."""
    expected = {t.name: t for t in shard.outputs}
    tensors = fp.get("tensors", {})
    if set(tensors) != set(expected):
        raise WireError("bad_response", f"fingerprint of {sorted(tensors)}, expected "
                                        f"{sorted(expected)}")
    for name, spec in expected.items():
        t = tensors[name]
        if t.get("dtype") != spec.dtype or len(t.get("shape", ())) != len(spec.shape):
            raise WireError("bad_response", f"fingerprint of {name!r} has the wrong dtype or "
                                            "rank")
        values = np.frombuffer(t.get("val", b""), dtype="<f4")
        if not (math.isfinite(t.get("sum", 0.0)) and math.isfinite(t.get("l2", 0.0))
                and bool(np.isfinite(values).all())):
            raise WireError("bad_response", f"non-finite outputs: the fingerprint of {name!r} "
                                            "holds NaN or infinite values")


def non_finite(tensors: Mapping[str, np.ndarray]) -> str:
    """'' when every floating-point tensor is finite, else which ones are not and how."""
    problems = []
    for name, value in tensors.items():
        if value.dtype.kind not in "fc":
            continue
        finite = np.isfinite(value)
        if not bool(finite.all()):
            nan = int(np.isnan(value).sum())
            problems.append(f"{name!r} has {nan} NaN and {int((~finite).sum()) - nan} "
                            f"infinite value(s) of {value.size}")
    return "; ".join(problems)


__all__ = [
    "ENCRYPTIONS",
    "FINGERPRINT_DOMAIN",
    "INFER",
    "MASK_SEED",
    "MAX_CIPHERTEXTS",
    "MAX_SEEDED_VALUES",
    "RECEIPT_DOMAIN",
    "WANTS",
    "CkksRequest",
    "InferReply",
    "InferRequest",
    "MaskSeed",
    "answer",
    "check_ckks_reply",
    "check_fingerprint_shape",
    "check_outputs",
    "check_reply",
    "ciphertexts_digest",
    "ckks_answer",
    "fingerprint_payload",
    "non_finite",
    "parse_request",
    "receipt_payload",
    "seeds_digest",
]
