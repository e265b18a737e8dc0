"""Links that are not loopback: ``testnet.py up --netem`` runs every node and the client in its
own network namespace, joined by scripts/netem.py's userspace link emulator.

A 2-node MiniLM testnet with ``delay 20ms`` on every host's egress: a TCP handshake between two
namespaces takes one round trip of >= 40 ms; an encrypted query from the client namespace answers
the plaintext model's embeddings; with ``loss 5%`` added (``testnet.py netem``, live) queries
still succeed; stopping the script leaves no namespace and no node process. ``testnet.py clean``
removes the namespaces of a run whose emulator was SIGKILLed. Needs root, iproute2 and
/dev/net/tun (they fail naming what is missing otherwise). Every namespace and process is removed at
teardown, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from node_helpers import stop_process, wait_for

from models import Pipeline

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import pid_alive as alive  # noqa: E402
from netem import clean, namespaces, require_tools, tag_for  # noqa: E402

DELAY = "delay 20ms"
RTT_S = 0.040  # two 20 ms one-way delays
SLACK_S = 0.030  # Python forwarding, scheduling, a loaded machine
TEXTS = ["A man is eating food.", "Encrypted inference keeps activations private."]
UP_TIMEOUT = 60.0


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools()  # root, ip (iproute2: `make test` installs it) and /dev/net/tun, or a
    # NetemError naming what is missing: these tests fail rather than skip without them


class Up:
    """One ``testnet.py up --netem`` process, its testnet.json and netem.json."""

    def __init__(self, root: Path, deployment: Path, model: Path) -> None:
        self.root, self.err = root, root.parent / f"{root.name}.stderr"
        cmd = [sys.executable, "scripts/testnet.py", "up", "--dir", str(root), "--nodes", "2",
               "--replicas", "1", "--threads", "1", "--deployment", str(deployment),
               "--model", str(model), "--netem", DELAY, "--seed", "7"]
        with open(self.err, "wb") as errf:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=errf)
        self.state: dict[str, Any] = {}
        self.links: dict[str, Any] = {}
        deadline = time.monotonic() + UP_TIMEOUT
        while not (root / "testnet.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"testnet.py up --netem did not come up:\n{self.stderr()}")
            time.sleep(0.1)
        self.state = json.loads((root / "testnet.json").read_text())
        self.links = json.loads((root / "netem.json").read_text())

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def ns(self, host: str) -> str:
        return str(self.links["hosts"][host]["namespace"])

    def pids(self) -> list[int]:
        return [n["pid"] for n in self.state.get("nodes", []) if n.get("pid")] + \
            ([self.links["pid"]] if self.links.get("pid") else [])

    def stop(self) -> None:
        stop_process(self.proc, 30)  # type: ignore[arg-type]
        for pid in self.pids():  # last resort: never leave a process or namespace behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        clean(self.root)


@pytest.fixture(scope="module")
def netem_net(tmp_path_factory: pytest.TempPathFactory, deployment_dir: Path,
              minilm_dir: Path) -> Iterator[Callable[[], Up]]:
    """``get()``: the running 2-node testnet in namespaces, started anew if a test stopped it."""
    base = tmp_path_factory.mktemp("netem")
    started: list[Up] = []

    def get() -> Up:
        if not started or started[-1].proc.poll() is not None:
            started.append(Up(base / f"net{len(started)}", deployment_dir, minilm_dir))
        return started[-1]

    try:
        yield get
    finally:
        for up in started:
            up.stop()


def in_ns(ns: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def query(up: Up, texts: list[str], *options: str) -> dict[str, Any]:
    veilnet = str(Path(sys.executable).parent / "veilnet")
    done = in_ns(up.ns("client"), veilnet, "query", "--json", "--verify", "none",
                 "--bootstrap", up.state["bootstrap"], "--deployment", up.state["deployment"],
                 *options, *texts)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


CONNECT = """
import socket, sys, time
times = []
for _ in range(5):
    t = time.perf_counter()
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()
    times.append(time.perf_counter() - t)
print(min(times), max(times))
"""


def test_round_trip_between_namespaces_is_twice_the_delay(netem_net: Callable[[], Up]) -> None:
    up = netem_net()
    addr = up.state["nodes"][0]["multiaddrs"][0].split("/")  # /ip4/<a>/tcp/<port>/p2p/...
    assert addr[2] == up.links["hosts"]["n0"]["address"] != "127.0.0.1"
    done = in_ns(up.ns("client"), sys.executable, "-c", CONNECT, addr[2], addr[4])
    assert done.returncode == 0, done.stderr
    fastest, slowest = map(float, done.stdout.split())
    assert RTT_S <= fastest < RTT_S + SLACK_S, (fastest, slowest)  # a handshake: one round trip


def test_encrypted_query_from_client_namespace_matches_plaintext(
        netem_net: Callable[[], Up], minilm_dir: Path) -> None:
    up = netem_net()
    result = query(up, TEXTS)
    embeddings = np.asarray(result["embeddings"], dtype=np.float32)
    reference = Pipeline(minilm_dir).embed(TEXTS)
    assert float(np.abs(embeddings - reference).max()) <= 1e-4
    hops = result["hops"]
    assert hops and all(h["latency_ms"] >= RTT_S * 1000 for h in hops)  # >= one round trip
    served = {n["peer_id"] for n in up.state["nodes"]}
    assert {h["peer_id"] for h in hops} <= served


def test_queries_succeed_with_five_percent_loss(netem_net: Callable[[], Up],
                                                minilm_dir: Path) -> None:
    up = netem_net()
    done = subprocess.run([sys.executable, "scripts/testnet.py", "netem", "--dir", str(up.root),
                           *DELAY.split(), "loss", "5%"], capture_output=True, text=True,
                          cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr
    try:
        result = query(up, TEXTS[:1], "--no-ledger")  # the inference path only
        reference = Pipeline(minilm_dir).embed(TEXTS[:1])
        assert float(np.abs(np.asarray(result["embeddings"]) - reference).max()) <= 1e-4
        stats = json.loads((up.root / "netem-stats.json").read_text())
        assert stats["netem"]["loss"] == 0.05
    finally:
        subprocess.run([sys.executable, "scripts/testnet.py", "netem", "--dir", str(up.root),
                        *DELAY.split()], capture_output=True, cwd=REPO, timeout=30)
    stats = json.loads((up.root / "netem-stats.json").read_text())
    assert stats["dropped"] > 0, stats  # the loss was real: packets were dropped


def test_stop_removes_namespaces_and_processes(netem_net: Callable[[], Up]) -> None:
    up = netem_net()
    tag, pids = up.links["tag"], up.pids()
    assert len(namespaces(f"veilnet-{tag}-")) == 3  # n0, n1, client
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0, up.stderr()
    assert namespaces(f"veilnet-{tag}-") == []
    assert [p for p in pids if alive(p)] == []
    assert not (up.root / "netem.json").exists() and not (up.root / "testnet.json").exists()
    stats = json.loads((up.root / "netem-stats.json").read_text())
    assert stats["forwarded"] > 0 and "packets forwarded" in up.stderr()


KILLED_RUN = """
import os, signal, subprocess, sys
sys.path.insert(0, "scripts")
from netem import Links
links = Links(sys.argv[1], ["n0", "client"], "delay 5ms").start()
sleeper = subprocess.Popen(links.wrap("n0", ["sleep", "300"]), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(links.proc.pid, sleeper.pid, flush=True)
if sys.argv[2] == "emulator-too":
    os.kill(links.proc.pid, signal.SIGKILL)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path) -> None:
    # the script is SIGKILLed: its emulator gets SIGTERM (PR_SET_PDEATHSIG) and cleans up
    root = tmp_path / "crashed"
    try:
        done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(root), "script-only"],
                              capture_output=True, text=True, cwd=REPO, timeout=30)
        emulator, sleeper = map(int, done.stdout.split())
        wait_for(lambda: not namespaces(f"veilnet-{tag_for(root)}-"),
                 f"removal of the namespaces ({done.stderr})", 10)
        wait_for(lambda: not alive(emulator) and not alive(sleeper),
                 "end of the emulator and of the process in the namespace", 5)
    finally:
        clean(root)
    # the emulator is SIGKILLed too: the namespaces stay until `testnet.py clean`
    root = tmp_path / "killed"
    try:
        done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(root), "emulator-too"],
                              capture_output=True, text=True, cwd=REPO, timeout=30)
        emulator, sleeper = map(int, done.stdout.split())
        assert sorted(namespaces(f"veilnet-{tag_for(root)}-")) == [
            f"veilnet-{tag_for(root)}-client", f"veilnet-{tag_for(root)}-n0"], done.stderr
        assert alive(sleeper)
        cleaned = subprocess.run([sys.executable, "scripts/testnet.py", "clean", "--dir",
                                  str(root)], capture_output=True, text=True, cwd=REPO,
                                 timeout=30)
        assert cleaned.returncode == 0, cleaned.stderr
        assert "namespace veilnet-" in cleaned.stdout
        assert namespaces(f"veilnet-{tag_for(root)}-") == []
        wait_for(lambda: not alive(sleeper), "end of the leftover process", 5)
        assert not (root / "netem.json").exists()
    finally:
        clean(root)
