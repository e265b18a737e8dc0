"""models/pipeline.py: ``run`` and ``run_async`` walk the same shards, in manifest order, feeding
each shard by name; with ``remote_nodes`` only the client shards are loaded. The reference is
the plain in-process ``Pipeline.run`` of the same deployment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from models import ManifestError, Pipeline, ShardSpec

TEXTS = ["A man is eating food.", "naïve café résumé", "The Merkle tree commits to it all."]


def test_run_async_equals_run_and_sees_every_node_shard(deployment_dir: Path) -> None:
    local = Pipeline(deployment_dir, threads=1)
    tokens = local.tokenizer(TEXTS)
    expected = local.run(tokens)
    remote = Pipeline(deployment_dir, threads=1, remote_nodes=True)
    calls: list[tuple[str, int, list[str]]] = []

    async def node(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(("node", shard.index, sorted(feeds)))
        await trio.sleep(0)
        return local.run_local(shard, feeds)  # "the network": a pipeline holding node shards

    async def client(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append((shard.role, shard.index, sorted(feeds)))
        return remote.run_local(shard, feeds)

    got = trio.run(remote.run_async, tokens, node, client)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    shards = remote.manifest.shards
    assert [(c[0], c[1]) for c in calls] == [
        ("node" if s.role == "node" else s.role, s.index) for s in shards]
    assert [c[2] for c in calls] == [sorted(t.name for t in s.inputs) for s in shards]


def test_remote_nodes_loads_only_client_shards(deployment_dir: Path) -> None:
    remote = Pipeline(deployment_dir, threads=1, remote_nodes=True)
    node_shard = remote.manifest.node_shards[0]
    with pytest.raises(ManifestError, match="runs elsewhere"):
        remote.run_local(node_shard, {})


def test_sync_node_runner_sees_the_node_shards(deployment_dir: Path) -> None:
    local = Pipeline(deployment_dir, threads=1)
    seen: list[int] = []

    def runner(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(shard.index)
        return local.run_local(shard, feeds)

    via_runner = Pipeline(deployment_dir, node_runner=runner, threads=1).embed(TEXTS)
    np.testing.assert_array_equal(via_runner, local.embed(TEXTS))
    assert seen == [s.index for s in local.manifest.node_shards]
