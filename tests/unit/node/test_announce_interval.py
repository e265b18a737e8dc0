"""Issue 12 item 9 without a node (split from tests/network/test_hardening_cards.py): a node's
announce interval is bounded by the card lifetime."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.card import MAX_TTL_S


def test_announce_interval_is_bounded_by_the_card_lifetime(tmp_path: Path) -> None:
    """A node's own cards must stay within MAX_TTL_S (3 intervals): longer intervals are refused
    at start with a clear error instead of producing cards every peer rejects."""
    from node.config import ConfigError, NodeConfig

    NodeConfig(data_dir=tmp_path, announce_interval=MAX_TTL_S / 3).check()
    with pytest.raises(ConfigError, match="announce_interval 101: at most 100 s"):
        NodeConfig(data_dir=tmp_path, announce_interval=101).check()
