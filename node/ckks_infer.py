"""``/veilnet/infer/1`` with ``"encryption": "ckks"``: a node evaluates its shard on CKKS
ciphertexts it cannot decrypt (crypto/ckks.py).

The request and the response are ``protocols.infer.CkksRequest`` and ``protocols.infer.ckks_answer``
(docs/protocol.md): one ciphertext per input feature in, one per output feature out, digests
over the public context and the ciphertexts, the usual receipt signature. Only square-activation
MLP shards (Gemm, square, Gemm) run this way (``unsupported`` otherwise). TenSEAL is loaded
when this module is.
"""

from __future__ import annotations

from typing import Any

import onnx
import trio

from crypto.ckks import (
    CkksError,
    MlpWeights,
    evaluate_mlp,
    load_public_context,
    mlp_weights_from_onnx,
)
from crypto.identity import Identity
from node.executor import ShardExecutor
from protocols.infer import CkksRequest, ckks_answer
from protocols.wire import WireError

_weights: dict[str, MlpWeights] = {}  # shard CID -> weights read from its ONNX file


async def infer_ckks(executor: ShardExecutor, identity: Identity,
                     request: CkksRequest, peer: str = "") -> dict[str, Any]:
    """The signed answer to a CKKS request; WireError (``unknown_shard``, ``corrupt_shard``,
    ``bad_context``, ``bad_parameters``, ``bad_ciphertext``, ``unsupported``)."""
    stored = await executor.verified(request.shard)

    def run() -> list[bytes]:
        weights = _weights.get(request.shard)
        if weights is None:
            weights = _weights[request.shard] = mlp_weights_from_onnx(onnx.load(str(stored.path)))
        ctx = load_public_context(request.context)
        return evaluate_mlp(ctx, request.ciphertexts, weights)

    try:
        async with executor.fair.slot(peer):
            outputs = await trio.to_thread.run_sync(run)
    except CkksError as exc:
        raise WireError(exc.code, str(exc)) from None
    return ckks_answer(identity, request, outputs)
