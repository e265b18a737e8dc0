"""Every test under tests/network/ starts node processes, testnets, veilnet subprocesses or
libp2p/HTTP servers on sockets: mark them all `network` (deselect with ``-m "not network"``)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.network)
