"""mask-seed requests (masked/1): the node that computes r W gets only a seed for r."""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
import numpy as np
import pytest

from crypto.identity import Identity
from crypto.masks import expand_mask, new_seed
from models import ShardSpec, TensorSpec
from protocols.infer import (
    MAX_SEEDED_VALUES,
    InferRequest,
    MaskSeed,
    answer,
    check_reply,
    parse_request,
)
from protocols.wire import WireError, decode_body

CID = "bafkrei" + "a" * 52
NODE = Identity.generate()
SHARD = ShardSpec(2, CID, "node", f"shards/{CID}.onnx",
                  (TensorSpec("x", "float64", ("rows", 4)),),
                  (TensorSpec("y", "float64", ("rows", 3)),))
WEIGHT = np.random.default_rng(5).normal(size=(4, 3))


def digest(tensors: dict[str, np.ndarray]) -> bytes:
    entries = [[n, a.dtype.name, list(a.shape), hashlib.sha256(a.tobytes()).digest()]
               for n, a in sorted(tensors.items())]
    return hashlib.sha256(cbor2.dumps(entries, canonical=True)).digest()


def seeds_digest(name: str, seed: bytes, shape: list[int], sigma: float) -> bytes:
    """docs/protocol.md: SHA-256(dCBOR(["veilnet-mask-seeds/1", [[name, seed, shape, sigma]]]))."""
    return hashlib.sha256(cbor2.dumps(["veilnet-mask-seeds/1", [[name, seed, shape, sigma]]],
                                      canonical=True)).digest()


def wire(message: dict[str, Any]) -> dict[str, Any]:
    return decode_body(cbor2.dumps(message))


def test_a_seeded_request_carries_no_tensor_and_the_node_draws_the_same_mask() -> None:
    seed = new_seed()
    request = InferRequest("r1", CID, {}, "outputs", {"x": MaskSeed(seed, (5, 4), 300.0)})
    message = wire(request.to_message())
    assert message["encryption"] == "mask-seed" and "inputs" not in message
    assert message["seeds"]["x"] == {"seed": seed, "shape": [5, 4], "sigma": 300.0}
    parsed = parse_request(message, "r1")
    assert isinstance(parsed, InferRequest) and parsed.inputs == {}
    drawn = parsed.expanded()
    mask = expand_mask(seed, (5, 4), 300.0)
    assert np.array_equal(drawn.inputs["x"], mask)
    # the node signs the seeds' digest (not megabytes of masks), the client checks it
    response = wire(answer(NODE, drawn, {"y": drawn.inputs["x"] @ WEIGHT}))
    expected = seeds_digest("x", seed, [5, 4], 300.0)
    assert response["input_digest"] == expected != digest({"x": mask})
    reply = check_reply(response, request, expected, NODE.peer_id, SHARD)
    assert reply.outputs is not None
    np.testing.assert_array_equal(reply.outputs["y"], mask @ WEIGHT)


def test_a_node_that_answered_for_other_seeds_is_refused() -> None:
    seed = new_seed()
    request = InferRequest("r2", CID, {}, "outputs", {"x": MaskSeed(seed, (2, 4), 1.0)})
    other = InferRequest("r2", CID, {}, "outputs", {"x": MaskSeed(new_seed(), (2, 4), 1.0)})
    drawn = other.expanded()
    response = wire(answer(NODE, drawn, {"y": drawn.inputs["x"] @ WEIGHT}))
    with pytest.raises(WireError, match="input digest"):
        check_reply(response, request, seeds_digest("x", seed, [2, 4], 1.0), NODE.peer_id,
                    SHARD)


def _message(**seed_fields: Any) -> dict[str, Any]:
    spec = {"seed": bytes(32), "shape": [2, 4], "sigma": 1.0, **seed_fields}
    return {"v": 1, "id": "r3", "shard": CID, "encryption": "mask-seed", "seeds": {"x": spec}}


@pytest.mark.parametrize(("fields", "message"), [
    ({"seed": b"short"}, "'seed' must be 32 bytes"),
    ({"seed": "text"}, "'seed' must be 32 bytes"),
    ({"shape": [2, -4]}, "'shape'"),
    ({"shape": []}, "'shape'"),
    ({"shape": [True, 4]}, "'shape'"),
    ({"sigma": 0}, "'sigma'"),
    ({"sigma": float("inf")}, "'sigma'"),
    ({"sigma": "1"}, "'sigma'"),
    ({"shape": [MAX_SEEDED_VALUES + 1]}, "expand to more than"),
])
def test_bad_seeds_are_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(WireError, match=message) as info:
        parse_request(_message(**fields), "r3")
    assert info.value.code == "bad_request"


def test_seeds_and_inputs_together_or_no_seeds_are_refused() -> None:
    both = {**_message(), "inputs": {}}
    with pytest.raises(WireError, match="not 'inputs'"):
        parse_request(both, "r3")
    with pytest.raises(WireError, match="non-empty map"):
        parse_request({**_message(), "seeds": {}}, "r3")
    with pytest.raises(WireError, match="mask-seed"):
        parse_request({**_message(), "encryption": "rot13"}, "r3")
