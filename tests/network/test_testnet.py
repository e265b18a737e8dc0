"""The local testnet, driven through scripts/testnet.py as a separate process.

Each test starts ``testnet.py up`` in tmp_path (nodes on 127.0.0.1, ports chosen by the OS),
waits for T/testnet.json and checks the network from outside: a ``veilnet query`` against the
plaintext model, a replica taking over from a SIGKILLed node, and that stopping the script leaves
no node process behind. The script is always stopped by the fixture, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_fixtures import assert_hop_signed
from node_helpers import CommandResult, veilnet_in_process

from models import Manifest, Pipeline
from registry.card import verify_card

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import pid_alive, processes_mentioning  # noqa: E402

TEXTS = ["A man is eating food.", "A man is riding a horse.", "¿Dónde está la biblioteca?"]
TOLERANCE = 1e-4
UP_TIMEOUT = 60.0


def veilnet_command() -> list[str]:
    script = Path(sys.executable).parent / "veilnet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "node"]


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Net:
    """One running ``testnet.py up`` process and what it wrote to testnet.json."""

    def __init__(self, proc: subprocess.Popen[bytes], root: Path, err: Path) -> None:
        self.proc, self.root, self.err = proc, root, err
        self.state: dict[str, Any] = {}

    @property
    def state_file(self) -> Path:
        return self.root / "testnet.json"

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_up(self) -> dict[str, Any]:
        deadline = time.monotonic() + UP_TIMEOUT
        while not self.state_file.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"testnet.py exited with {self.proc.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no testnet.json after {UP_TIMEOUT:g} s:\n{self.stderr()}")
            time.sleep(0.1)
        self.state = json.loads(self.state_file.read_text())
        return self.state

    def node_pids(self) -> list[int]:
        return [n["pid"] for n in self.state.get("nodes", [])]

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.node_pids():  # last resort: never leave a node behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def launch(root: Path, err: Path, deployment_dir: Path | None, minilm_dir: Path,
           *extra: str) -> Net:
    """Start ``testnet.py up --dir root`` (with the session's deployment unless it is None)."""
    cmd = [sys.executable, "scripts/testnet.py", "up", "--dir", str(root),
           "--threads", "1", *extra]
    if deployment_dir is not None:
        cmd += ["--deployment", str(deployment_dir), "--model", str(minilm_dir)]
    with open(err, "wb") as errf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errf)
    return Net(proc, root, err)


@pytest.fixture
def start_testnet(tmp_path: Path, deployment_dir: Path,
                  minilm_dir: Path) -> Iterator[Callable[..., Net]]:
    """Start ``testnet.py up`` with the session's deployment; stopped at teardown."""
    started: list[Net] = []

    def start(*extra: str, deployment: bool = True) -> Net:
        net = launch(tmp_path / f"net{len(started)}", tmp_path / f"net{len(started)}.stderr",
                     deployment_dir if deployment else None, minilm_dir, *extra)
        started.append(net)
        return net

    try:
        yield start
    finally:
        for net in started:
            net.terminate()


THREE_NODES = ("--nodes", "3", "--replicas", "1")


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory, deployment_dir: Path,
                minilm_dir: Path) -> Iterator[Callable[[], Net]]:
    """``testnet.py up --nodes 3 --replicas 1``, shared by the query test (which leaves it as it
    found it) and the SIGTERM test (which stops it): ``get()`` returns the running testnet, and
    starts a new one, in a new directory, if there is none or a test stopped it (so the tests
    pass in any order, each on a testnet it did not change)."""
    base = tmp_path_factory.mktemp("three")
    started: list[Net] = []

    def get() -> Net:
        if started and started[-1].proc.poll() is None:
            return started[-1]
        net = launch(base / f"net{len(started)}", base / f"net{len(started)}.stderr",
                     deployment_dir, minilm_dir, *THREE_NODES)
        started.append(net)
        net.wait_up()
        return net

    try:
        yield get
    finally:
        for net in started:
            net.terminate()


def query_json(bootstrap: str, deployment: Path, texts: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [*veilnet_command(), "query", "--json", "--verify", "none", "--bootstrap", bootstrap,
         "--deployment", str(deployment), *texts],  # one node per shard: nothing to compare
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_query_through_testnet_matches_plaintext(three_nodes: Callable[[], Net],
                                                 deployment_dir: Path, minilm_dir: Path) -> None:
    net = three_nodes()
    state = net.state
    nodes = {n["peer_id"]: n for n in state["nodes"]}
    node_shards = Manifest.load(deployment_dir).node_shards
    assert len(nodes) == 3
    assert state["bootstrap"] in state["nodes"][0]["multiaddrs"]
    # every node shard on exactly one node, and the nodes' own view agrees with testnet.json
    for shard in node_shards:
        assert sum(shard.cid in n["shards"] for n in state["nodes"]) == 1
    for n in state["nodes"]:
        assert pid_alive(n["pid"])
        served = {s["cid"] for s in http_json(f"{n['http']}/v1/node")["shards"]}
        assert served == set(n["shards"])
    # discovery: every node indexed every node's signed card, naming the shards it serves
    for viewer in state["nodes"]:
        cards = http_json(f"{viewer['http']}/v1/agents")
        known = {verify_card(c).peer_id: set(verify_card(c).shard_cids) for c in cards}
        assert known == {pid: set(n["shards"]) for pid, n in nodes.items()}

    answer = query_json(state["bootstrap"], deployment_dir, TEXTS)
    embeddings = np.asarray(answer["embeddings"], dtype=np.float32)
    reference = Pipeline(minilm_dir).embed(TEXTS)  # plaintext, computed here
    assert embeddings.shape == reference.shape == (len(TEXTS), 384)
    assert np.abs(embeddings - reference).max() <= TOLERANCE

    assert [h["shard_index"] for h in answer["hops"]] == [s.index for s in node_shards]
    for hop, shard in zip(answer["hops"], node_shards, strict=True):
        assert hop["shard_cid"] == shard.cid
        assert hop["peer_id"] in nodes, hop
        assert shard.cid in nodes[hop["peer_id"]]["shards"]
        assert hop["node_did"] == nodes[hop["peer_id"]]["did"]
        assert_hop_signed(hop)
        assert hop["attempts"] == 1 and hop["failures"] == []


def test_replica_takes_over_from_killed_node(start_testnet: Callable[..., Net],
                                             deployment_dir: Path, minilm_dir: Path) -> None:
    from client import Client

    net = start_testnet("--nodes", "4", "--replicas", "2")
    state = net.wait_up()
    for shard in Manifest.load(deployment_dir).node_shards:
        holders = [n["index"] for n in state["nodes"] if shard.cid in n["shards"]]
        assert len(holders) == 2, (shard.cid, holders)
    victim = next(n for n in reversed(state["nodes"]) if n["shards"] and n["index"] != 0)
    os.kill(victim["pid"], signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(victim["pid"]), 10), "the killed node is still there"

    def victim_state() -> dict[str, Any]:
        return json.loads(net.state_file.read_text())["nodes"][victim["index"]]

    # the script notices and rewrites testnet.json: the dead node is not listed as alive
    assert wait_for(lambda: not victim_state()["alive"], 5), victim_state()
    assert victim_state()["pid"] is None and victim_state()["exit_code"] == -signal.SIGKILL

    reference = Pipeline(minilm_dir).embed(TEXTS)
    retried = None
    # Node 0 still lists the dead node, and a client picks among a shard's nodes at random,
    # so a fresh client tries the dead node first half of the time; 16 tries make missing
    # that less likely than 1 in 60000.
    for _ in range(16):
        with Client([state["bootstrap"]], deployment_dir, verify="none") as client:
            result = client.embed(TEXTS)
        assert np.abs(result.embeddings - reference).max() <= TOLERANCE
        for hop in result.hops:
            assert hop.peer_id != victim["peer_id"]
            assert_hop_signed(hop)
            if hop.attempts > 1:
                retried = hop
        if retried is not None:
            break
    assert retried is not None, "no query ever tried the killed node"
    assert retried.shard_cid in victim["shards"]
    assert retried.attempts == 2
    assert len(retried.failures) == 1 and retried.failures[0].startswith(victim["peer_id"])
    # the script noticed the crash and said so
    assert wait_for(lambda: f"node {victim['index']} (pid {victim['pid']}) exited"
                    in net.stderr(), 5), net.stderr()


def test_sigterm_stops_every_node(three_nodes: Callable[[], Net]) -> None:
    net = three_nodes()  # the query test's testnet when it ran first: it only queried it
    state = net.state
    pids = net.node_pids()
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    net.proc.send_signal(signal.SIGTERM)
    assert net.proc.wait(timeout=15) == 0, net.stderr()
    assert wait_for(lambda: not any(pid_alive(p) for p in pids), 5), \
        [p for p in pids if pid_alive(p)]
    assert not net.state_file.exists()
    assert not any((Path(n["data_dir"]) / "node.json").exists() for n in state["nodes"])
    assert processes_mentioning(str(net.root)) == []


def test_failed_node_start_stops_the_others(start_testnet: Callable[..., Net],
                                            tmp_path: Path) -> None:
    """Node 2 cannot read its identity key: the script says so and stops nodes 0 and 1."""
    broken = tmp_path / "net0" / "nodes" / "node2" / "identity.key"  # the first net's dir
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a key")
    broken.chmod(0o600)
    net = start_testnet("--nodes", "3")
    assert net.root == broken.parents[2]
    assert net.proc.wait(timeout=UP_TIMEOUT) == 1
    err = net.stderr()
    assert "node 2 (pid" in err and "exited with code 2 before it was ready" in err, err
    assert "identity.key" in err.split("last lines of", 1)[1], err  # the node's own message
    assert not net.state_file.exists()
    assert processes_mentioning(str(net.root)) == []
    assert "node stopped" in (net.root / "nodes" / "node0" / "node.log").read_text()


def test_more_replicas_than_nodes_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/testnet.py", "up", "--dir", str(tmp_path / "t"),
         "--nodes", "2", "--replicas", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "--replicas 3 is more than --nodes 2" in result.stderr
    assert not (tmp_path / "t").exists()


def test_plain_queries_log_scores_and_rank_the_liar_last(start_testnet: Callable[..., Net],
                                                         deployment_dir: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    """Six plain ``veilnet query`` calls (no ledger flag: receipts and score reports are on
    by default when the network has a ledger node) against ``testnet.py up --nodes 5
    --byzantine 1``; then node 0's GET /v1/rankings ranks the lying node last.

    The first call runs the installed console script as a subprocess; the other five call
    the function that script calls (``node.cli.main``) in this process, which saves a Python
    start-up and the imports per call. Each call still builds its own client with a fresh
    identity, as a new process does, so the rankings aggregate six clients' reports. Each
    report alone ranks the liar last (default verify=full on all 3 holders of a shard: the
    liar loses every verdict it takes part in, and a caught node scores at most its agreement,
    consensus/reputation.py), and the ranking clips each report to the median over reporters,
    so six show what the twelve this used to send showed (one or two off reports cannot move
    a median of six)."""
    net = start_testnet("--nodes", "5", "--byzantine", "1")
    state = net.wait_up()
    liars = [n["did"] for n in state["nodes"] if n["byzantine"]]
    assert len(liars) == 1 and state["ledger_nodes"] == [0]
    for i in range(6):
        args = ["query", "--bootstrap", state["bootstrap"], "--deployment", str(deployment_dir),
                f"query {i}: {TEXTS[i % len(TEXTS)]}"]
        if i == 0:
            done = subprocess.run([*veilnet_command(), *args], capture_output=True, text=True,
                                  timeout=120, cwd=REPO)
            result = CommandResult(done.returncode, done.stdout, done.stderr)
        else:
            result = veilnet_in_process(capsys, *args)
        assert result.returncode == 0, result.stderr
        assert "receipt: entry" in result.stdout, result.stdout  # logged without being asked
    rankings_url = f"{state['nodes'][0]['http']}/v1/rankings"
    rows: list[dict[str, Any]] = []

    def ranked() -> bool:
        nonlocal rows
        rows = http_json(rankings_url)
        return len(rows) == len(state["nodes"])

    assert wait_for(ranked, 30), f"rankings never covered every node: {rows}"
    assert rows[-1]["did"] == liars[0], rows
    assert all(r["score"] > rows[-1]["score"] for r in rows[:-1]), rows
    assert rows[0]["reporters"] >= 2, rows  # several clients' score reports, aggregated


def test_a_testnet_restarted_in_the_same_directory_forms_again(
        tmp_path: Path, deployment_dir: Path, minilm_dir: Path) -> None:
    """The nodes keep their identities and their card index across runs, so each new node
    first knows its peers at their previous addresses (as `make demo` restarts the testnet
    directory for its generation part). py-libp2p dials only the first TCP address it knows
    of a peer: the bootstrap node's new address must be the one dialled."""
    from localnet import Testnet

    from client import Client

    for run in range(2):
        with Testnet(tmp_path / "t", nodes=2, replicas=1, deployment=deployment_dir,
                     model=minilm_dir, timeout=30) as net, \
                Client([net.bootstrap], deployment_dir, verify="none", ledger=False) as client:
            result = client.embed(TEXTS[:1])
            assert result.embeddings.shape[0] == 1, run
            assert {h.peer_id for h in result.hops} <= {n.peer_id for n in net.nodes}
