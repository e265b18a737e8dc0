"""Client SDK checks that need no node: bad arguments, the client shards as the secret (modes and
CIDs, refused before any host is started), and failure memory and one-line reasons. Split from
tests/network/test_client.py, which runs the client against real nodes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import trio
from client_fixtures import closed_port_addr

from client import Client
from client.deployment import SecretFileError
from models import Manifest, ManifestError

pytest_plugins = ["client_fixtures"]


# -- bad arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("bootstrap", [
    "not a multiaddr", "/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/p2p/notapeerid"])
def test_malformed_bootstrap(bootstrap: str, deployment_dir: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bootstrap))):
        Client([bootstrap], deployment_dir)


def test_no_bootstrap(deployment_dir: Path) -> None:
    with pytest.raises(ValueError):
        Client([], deployment_dir)


def test_full_mode_needs_two_replicas(deployment_dir: Path) -> None:
    with pytest.raises(ValueError, match="replicas >= 2"):
        Client([closed_port_addr()], deployment_dir, verify="full", replicas=1)


# -- the client shards are the secret ------------------------------------------------------------

@pytest.fixture
def private_copy(deployment_dir: Path, tmp_path: Path) -> Path:
    """A copy of the deployment (modes preserved)."""
    out = tmp_path / "deploy"
    shutil.copytree(deployment_dir, out)
    return out


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=["0644", "0640", "0604"])
def test_client_refuses_readable_client_shards(private_copy: Path, manifest: Manifest,
                                               mode: int) -> None:
    head = private_copy / manifest.head.path
    head.chmod(mode)
    with pytest.raises(SecretFileError) as info:
        Client([closed_port_addr()], private_copy)
    message = str(info.value)
    assert str(head) in message and f"{mode:04o}" in message, message
    assert f"chmod 600 {head}" in message, message


def test_client_refuses_a_readable_key_file(private_copy: Path) -> None:
    key = private_copy / "client" / "key.json"
    key.chmod(0o644)
    with pytest.raises(SecretFileError, match=re.escape(f"chmod 600 {key}")):
        Client([closed_port_addr()], private_copy)


def test_client_refuses_a_tampered_client_shard(private_copy: Path, manifest: Manifest) -> None:
    tail = private_copy / manifest.tail.path
    data = bytearray(tail.read_bytes())
    data[len(data) // 2] ^= 0x01
    tail.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        Client([closed_port_addr()], private_copy)
    message = str(info.value)
    assert str(tail) in message and manifest.tail.cid in message, message


# -- failure memory and one-line reasons --------------------------------------------------------

def test_peer_health_backoff_doubles_to_a_cap_and_resets() -> None:
    from client.health import PeerHealth

    now = [100.0]
    health = PeerHealth(base=5.0, cap=30.0, clock=lambda: now[0])
    assert health.backoff_left("a") == 0.0 and health.failures("a") == 0
    assert [health.failed("a", "no answer within 30 s") for _ in range(5)] == [5, 10, 20, 30, 30]
    assert health.backoff_left("a") == 30.0 and health.failures("a") == 5
    assert "5 consecutive failure(s), the last: no answer within 30 s" in health.skip_note("a")
    now[0] += 29.0
    assert health.backoff_left("a") == 1.0
    now[0] += 1.0
    assert health.backoff_left("a") == 0.0  # asked again: one probe
    health.succeeded("a", 40.0)
    assert health.failures("a") == 0 and health.failed("a", "x") == 5.0  # reset by the answer
    assert health.backoff_left("b") == 0.0  # per peer


def test_hedge_delay_follows_the_median_latency() -> None:
    from client.health import HEDGE_DEFAULT_S, HEDGE_MIN_S, PeerHealth

    health = PeerHealth()
    assert health.hedge_delay(30.0) == HEDGE_DEFAULT_S  # nothing measured yet
    for ms in (50, 60, 70):
        health.succeeded("a", ms)
    assert health.hedge_delay(30.0) == HEDGE_MIN_S  # 4 x 60 ms is below the floor
    for ms in (900, 1000, 1100, 1200):
        health.succeeded("b", ms)
    assert health.hedge_delay(30.0) == pytest.approx(4 * 0.9)
    assert health.hedge_delay(2.0) == 2.0  # never beyond the hop timeout


def test_failure_reasons_are_one_line_and_never_empty() -> None:
    from client.health import describe

    multi = RuntimeError("Failed to open stream to peer X:\n  Error: timed out\n  Protocols: []")
    assert describe(multi, 30) == ("RuntimeError: Failed to open stream to peer X: Error: timed "
                                   "out Protocols: []")
    assert describe(ConnectionError(), 30) == "ConnectionError"
    assert describe(ValueError("   \n "), 30) == "ValueError"
    assert describe(trio.TooSlowError(), 2.5) == "no answer within 2.5 s"
    long = describe(RuntimeError("x" * 5000), 30)
    assert len(long) <= 300 and long.endswith("...") and "\n" not in long
