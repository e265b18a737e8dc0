"""``/veilnet/infer/1`` with ``"encryption": "ckks"``: a node evaluates its shard on CKKS
ciphertexts it cannot decrypt (crypto/ckks.py).

Request ``{"v": 1, "id", "shard", "encryption": "ckks", "context": bytes (public TenSEAL
context), "ciphertexts": [bytes, ...] (one per input feature, samples in the slots)}``; response
``{"v": 1, "id", "shard", "encryption": "ckks", "ciphertexts": [...] (one per output),
"input_digest", "output_digest", "node", "signature"}``. Digests are
``crypto.ckks.ciphertexts_digest`` over the context and the ciphertexts; the signature is the
usual receipt signature over them.
"""

from __future__ import annotations

from typing import Any

import onnx
import trio

from crypto.ckks import (
    MAX_CIPHERTEXTS,
    CkksError,
    MlpWeights,
    ciphertexts_digest,
    evaluate_mlp,
    load_public_context,
    mlp_weights_from_onnx,
)
from crypto.identity import Identity
from node.executor import ShardExecutor
from node.wire import WIRE_VERSION, WireError, receipt_payload

_weights: dict[str, MlpWeights] = {}  # shard CID -> weights read from its ONNX file


async def infer_ckks(executor: ShardExecutor, identity: Identity,
                     message: dict[str, Any]) -> dict[str, Any]:
    shard = message["shard"]
    stored = await executor.verified(shard)  # WireError unknown_shard, corrupt_shard
    context, ciphertexts = message.get("context"), message.get("ciphertexts")
    if not isinstance(ciphertexts, list) or not 1 <= len(ciphertexts) <= MAX_CIPHERTEXTS \
            or not all(isinstance(c, bytes) for c in ciphertexts):
        raise WireError("bad_request", f"'ciphertexts' must be a list of 1 to {MAX_CIPHERTEXTS} "
                                       "serialized CKKS vectors")
    if not isinstance(context, bytes):
        raise WireError("bad_request", "'context' must be the serialized public TenSEAL context")

    def run() -> list[bytes]:
        weights = _weights.get(shard)
        if weights is None:
            weights = _weights[shard] = mlp_weights_from_onnx(onnx.load(str(stored.path)))
        ctx = load_public_context(context)
        return evaluate_mlp(ctx, ciphertexts, weights)

    try:
        outputs = await trio.to_thread.run_sync(run, limiter=executor.limiter)
    except CkksError as exc:
        raise WireError(exc.code, str(exc)) from None
    input_digest = ciphertexts_digest(context, ciphertexts)
    output_digest = ciphertexts_digest(context, outputs)
    return {
        "v": WIRE_VERSION, "id": message["id"], "shard": shard, "encryption": "ckks",
        "ciphertexts": outputs, "input_digest": input_digest, "output_digest": output_digest,
        "node": identity.did,
        "signature": identity.sign(receipt_payload(message["id"], shard, input_digest,
                                                   output_digest)),
    }
