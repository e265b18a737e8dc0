"""How scripts/testnet.py places shards on nodes (split from tests/network/test_testnet.py, which
runs real testnets)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
from testnet import TestnetError, place_shards  # noqa: E402


def test_placement_round_robin() -> None:
    placement = place_shards(["a", "b", "c"], nodes=3, replicas=2)
    assert placement == {"a": [0, 1], "b": [2, 0], "c": [1, 2]}
    with pytest.raises(TestnetError, match="more than --nodes"):
        place_shards(["a"], nodes=2, replicas=3)
