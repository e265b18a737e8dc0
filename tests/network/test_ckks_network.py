"""CKKS mode over the network: a node rejects bad CKKS requests and keeps serving, and a testnet
query whose node computes on ciphertexts only (the in-process tests are in
tests/unit/crypto/test_ckks.py)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_fixtures import assert_hop_signed
from node_helpers import ClientThread, NodeProcess, serving_node

from crypto.ckks import (
    decrypt_columns,
    encrypt_columns,
    mlp_weights_from_onnx,
    new_context,
    public_context_bytes,
)
from models import Manifest
from models.digits import forward, load_digits_split
from protocols import INFER
from protocols.infer import ciphertexts_digest
from protocols.transport import RemoteError, connect, peer_info, request
from protocols.wire import WIRE_VERSION

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckks_node(request: pytest.FixtureRequest, digits_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    return serving_node(request, tmp_path_factory.mktemp("ckksnode") / "D", digits_dir)


def test_node_rejects_bad_ckks_requests_and_keeps_serving(ckks_node: NodeProcess,
                                                          digits_dir: Path) -> None:
    shard = Manifest.load(digits_dir).node_shards[0].cid
    ctx = new_context()
    cts = encrypt_columns(ctx, load_digits_split().x_test[:2])
    peer = ClientThread().start()
    try:
        async def send(host: Any, body: dict[str, Any]) -> Any:
            info = peer_info(ckks_node.addr)
            await connect(host, info, 10)
            try:
                return await request(host, info.peer_id, INFER, {
                    "v": WIRE_VERSION, "id": secrets.token_hex(8), "shard": shard,
                    "encryption": "ckks", **body}, 60)
            except RemoteError as exc:
                return exc.code

        assert peer.run(send, {"context": ctx.serialize(save_secret_key=True),
                               "ciphertexts": cts}) == "bad_context"
        assert peer.run(send, {"context": b"junk", "ciphertexts": cts}) == "bad_context"
        assert peer.run(send, {"context": public_context_bytes(ctx),
                               "ciphertexts": cts[:5]}) == "bad_inputs"
        answer = peer.run(send, {"context": public_context_bytes(ctx), "ciphertexts": cts})
        assert isinstance(answer, dict), answer
        assert answer["input_digest"] == ciphertexts_digest(public_context_bytes(ctx), cts)
        logits = decrypt_columns(ctx, answer["ciphertexts"], 2)
        assert logits.shape == (2, 10)
    finally:
        peer.close()


def test_testnet_query_in_ckks_mode_returns_the_right_digits(digits_dir: Path,
                                                             tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from localnet import Testnet

    from client import Client

    data = load_digits_split()
    pixels = (data.x_test[:64] * 16).astype(np.float32)
    params = {k: v for k, v in zip(("W1", "b1", "W2", "b2"), _weights_of(digits_dir),
                                   strict=True)}
    expected = forward(params, data.x_test[:64].astype(np.float64)).argmax(1)
    with Testnet(tmp_path / "T", nodes=2, replicas=1, deployment=digits_dir, model=digits_dir,
                 node_args=["--threads", "1"], ledger_nodes=(), log=lambda _: None) as net, \
            Client([net.bootstrap], net.deployment, verify="none") as client:
        outputs, hops = client.run_ckks({"pixels": pixels})
    assert np.array_equal(outputs["probabilities"].argmax(1), expected)
    assert len(hops) == 1
    assert_hop_signed(hops[0])
    node_of_shard = {cid: where for cid, where in net.placement.items()}
    assert hops[0].shard_cid in node_of_shard


def _weights_of(digits_dir: Path) -> tuple[np.ndarray, ...]:
    import onnx

    node = Manifest.load(digits_dir).node_shards[0]
    w = mlp_weights_from_onnx(onnx.load(str(digits_dir / node.path)))
    return w.w1, w.b1, w.w2, w.b2
