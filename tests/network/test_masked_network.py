"""masked/1 through a real testnet: node processes run the linear layers on masked inputs in
pairs; the client checks every product (Freivalds) and does everything else. Answers are
compared with the plaintext model run in this process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import Manifest, Pipeline

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["A man is eating food.", "Masked offload hides every activation from one node.",
         "x", "The quick brown fox jumps over the lazy dog near the riverbank. " * 6]


@pytest.fixture(scope="module")
def net(masked_deployment: Path, minilm_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Four nodes, every node shard on all four; node 3 lies (noise on its outputs)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from localnet import Testnet

    with Testnet(tmp_path_factory.mktemp("masked") / "T", nodes=4, replicas=4,
                 deployment=masked_deployment, model=minilm_dir,
                 node_args=["--threads", "1", "--announce-interval", "2"],
                 byzantine=1, byzantine_mode="noise", log=lambda _: None) as testnet:
        yield testnet


@pytest.fixture(scope="module")
def plaintext(minilm_dir: Path) -> Pipeline:
    return Pipeline(minilm_dir)


def test_masked_queries_match_the_plaintext_model_and_catch_the_liar(
        net: Any, plaintext: Pipeline, masked_deployment: Path) -> None:
    from client import Client

    manifest = Manifest.load(masked_deployment)
    node_shards = {s.cid: s for s in manifest.node_shards}
    liar = net.nodes[3]
    caught_in: list[str] = []
    with Client([net.bootstrap], masked_deployment, ledger=True, seed=11) as client:
        # two queries: the second, with fresh masks and pairs, shows the first's match was no
        # accident; the liar is caught in the first already (below), and a third repeated both
        for query in range(2):
            texts = [f"query {query}: {t}" for t in TEXTS]
            result = client.embed(texts)
            diff = float(np.abs(result.embeddings - plaintext.embed(texts)).max())
            print(f"query {query}: max |masked - plaintext| = {diff:.2e}")
            assert diff <= 1e-6
            # two records per node shard, in order: the masked input's node, then the mask's
            assert [h.shard_cid for h in result.hops[::2]] == list(node_shards)
            for a, b in zip(result.hops[::2], result.hops[1::2], strict=True):
                assert a.shard_cid == b.shard_cid and a.peer_id != b.peer_id
                assert a.node_did != b.node_did
                assert (a.verdict or {}).get("role") == "masked-input"
                assert (b.verdict or {}).get("role") == "mask-seed"
                assert a.verified and b.verified
                assert liar.peer_id not in (a.peer_id, b.peer_id)  # never a used answer
                caught_in += [f for f in a.failures if "Freivalds" in f]
            assert result.receipt is not None, result.receipt_error
    # the liar is in a pair for about half of the first query's 24 calls (2^-24 that it never
    # is): it is caught on the call it lies, and only it
    assert caught_in and all(f.startswith(liar.peer_id) for f in caught_in)


def test_rankings_put_the_liar_last_and_a_crashed_node_is_replaced(
        net: Any, plaintext: Pipeline, masked_deployment: Path) -> None:
    import time

    import httpx

    from client import Client

    liar = net.nodes[3]
    # the first test's clients published their score reports to node 0's ledger
    deadline = time.monotonic() + 30
    while True:
        rows = httpx.get(f"{net.nodes[1].http}/v1/rankings", timeout=5).json()
        if rows and rows[-1]["did"] == liar.did:
            break
        assert time.monotonic() < deadline, f"the liar {liar.did} is not last: {rows}"
        time.sleep(0.5)
    # node 2 dies: every call still finds a pair among nodes 0, 1 (and the liar, avoided)
    net.stop_node(2)
    try:
        with Client([net.bootstrap], masked_deployment, ledger=False, seed=5) as client:
            texts = ["a node died, the query goes on", "masked pairs re-form"]
            result = client.embed(texts)
            assert np.abs(result.embeddings - plaintext.embed(texts)).max() <= 1e-6
            used = {h.peer_id for h in result.hops}
            assert net.nodes[2].peer_id not in used and liar.peer_id not in used
            assert used == {net.nodes[0].peer_id, net.nodes[1].peer_id}
    finally:
        net.start_node(2)
