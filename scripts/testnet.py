"""A local veilnet testnet: N node processes on 127.0.0.1 serving an encrypted MiniLM deployment.

Command line (``python scripts/testnet.py --help``)::

    testnet.py up   [--dir T] [--nodes N] [--replicas R] [--node-shards K] ...   run until Ctrl-C
    testnet.py demo [--dir T] [--nodes N] [--replicas R] ...                     `make demo`

``up`` imports and encrypts all-MiniLM-L6-v2 into T/model and T/deploy (once; reused while
T/deploy/manifest.json exists), places every node shard on R of the N nodes round robin, starts
node 0 and then the others with ``--bootstrap <node 0>``, waits until every node answers /healthz
and node 0 knows all the others, writes T/testnet.json, and runs until SIGINT or SIGTERM. Then it
stops every node (SIGTERM, SIGKILL after 5 s) and removes T/testnet.json. ``demo`` does the same
in-process, runs encrypted queries through the network, compares them with the plaintext model,
crashes one node to show a hop being retried on another replica, and stops the network.

Layout of T::

    T/model/              plaintext MiniLM shards (for the plaintext comparison only)
    T/deploy/             encrypted deployment; T/deploy/client/ (key) stays with the client
    T/nodes/node<i>/      node data dir: identity.key (kept across runs), shards/, node.json,
                          node.log (the node's stdout and stderr)
    T/testnet.json        written when the network is up, removed when it stops:
                          {"nodes": [{"index", "pid", "did", "peer_id", "multiaddrs", "http",
                                      "data_dir", "shards", "log"}],
                           "deployment", "model", "bootstrap", "pid", "placement"}

Python API (e.g. bench/e2e.py: ``sys.path.insert(0, "scripts"); from testnet import Testnet``)::

    with Testnet("testnet-data", nodes=3, replicas=1, node_shards=3,
                 node_args=["--threads", "1"]) as net:
        net.bootstrap       # node 0's multiaddr (/ip4/127.0.0.1/tcp/.../p2p/<PeerID>)
        net.deployment      # Path of the encrypted deployment (give it to client.Client)
        net.model           # Path of the plaintext model dir (None if not known)
        net.nodes           # list[NodeInfo]: index, pid, peer_id, did, multiaddrs, http,
                            #   data_dir, shards (CIDs), log, alive
        net.placement       # {shard CID: [node indexes]}
        net.stop_node(2)              # SIGTERM one node (kill=True: SIGKILL, like a crash)
        net.start_node(2)             # start it again (same identity, same shards)
        net.log_tail(2)               # last lines of its node.log

``Testnet(dir, nodes=3, replicas=1, node_shards=None, *, deployment=None, model=None,
node_args=(), timeout=60.0, log=<stderr>)``: ``deployment``/``model`` reuse existing directories
instead of T/deploy and T/model; ``node_shards`` (default 3) only matters when MiniLM has to be
imported; ``node_args`` are appended to every ``veilnet node start`` (e.g. ``--threads 1``,
``--capacity 2``); ``timeout`` bounds the start-up. ``start()``/``stop()`` can be called instead of
``with``; ``stop()`` is idempotent. Any failure while starting stops every process started so far
and raises ``TestnetError`` naming the node and quoting the tail of its log.

No orphans: nodes run in their own session (a terminal's Ctrl-C reaches only this script, which
stops them in order) and, on Linux, with PR_SET_PDEATHSIG=SIGTERM, so they stop even if this
process is SIGKILLed. The death signal follows the *thread* that started the node: start and stop
a testnet from one long-lived thread (normally the main thread).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path("testnet-data")
DEFAULT_NODE_SHARDS = 3
LISTEN = "/ip4/127.0.0.1/tcp/0"
HTTP = "127.0.0.1:0"
STATE_FILE = "testnet.json"
LOCK_FILE = "testnet.lock"
STOP_GRACE = 5.0

PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


class TestnetError(RuntimeError):
    """The testnet could not be set up or started; the message says which node and why."""

    __test__ = False  # not a pytest test class


def _stderr_log(message: str) -> None:
    print(f"testnet: {message}", file=sys.stderr, flush=True)


@dataclass
class NodeInfo:
    index: int
    data_dir: Path
    log: Path
    shards: list[str]  # CIDs placed on this node
    pid: int | None = None
    peer_id: str | None = None
    did: str | None = None
    multiaddrs: list[str] = field(default_factory=list)
    http: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def multiaddr(self) -> str:
        """The node's loopback multiaddr, ending in /p2p/<PeerID>."""
        for addr in self.multiaddrs:
            if addr.startswith("/ip4/127.0.0.1/"):
                return addr
        if not self.multiaddrs:
            raise TestnetError(f"node {self.index} has no multiaddr (is it running?)")
        return self.multiaddrs[0]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "did": self.did, "peer_id": self.peer_id,
                "multiaddrs": self.multiaddrs, "http": self.http,
                "data_dir": str(self.data_dir), "shards": self.shards, "log": str(self.log),
                "alive": self.alive}


def place_shards(shard_cids: Sequence[str], nodes: int, replicas: int) -> dict[str, list[int]]:
    """Round robin: replica r of the i-th node shard goes to node (i*R + r) mod N."""
    if nodes < 1:
        raise TestnetError("a testnet needs at least one node")
    if replicas < 1:
        raise TestnetError("--replicas must be at least 1")
    if replicas > nodes:
        raise TestnetError(f"--replicas {replicas} is more than --nodes {nodes}: each replica of "
                           "a shard must be on a different node")
    return {cid: [(i * replicas + r) % nodes for r in range(replicas)]
            for i, cid in enumerate(shard_cids)}


def prepare_model(root: Path, node_shards: int | None, log: Callable[[str], None],
                  ) -> tuple[Path, Path]:
    """T/model and T/deploy, importing and encrypting MiniLM if T/deploy is not there yet."""
    from models import Manifest, encrypt_model_dir, import_minilm

    model, deploy = root / "model", root / "deploy"
    if (deploy / "manifest.json").is_file():
        have = len(Manifest.load(deploy).node_shards)
        if node_shards is not None and have != node_shards:
            raise TestnetError(f"{deploy} has {have} node shards, not {node_shards}: use another "
                               f"--dir, or delete {root} to re-import")
        return model, deploy
    if not (model / "manifest.json").is_file():
        if model.exists():
            shutil.rmtree(model)  # an import that did not finish
        k = node_shards or DEFAULT_NODE_SHARDS
        log(f"importing all-MiniLM-L6-v2 into {model} ({k} node shards)")
        import_minilm(model, node_shards=k, progress=log)
    elif node_shards is not None and len(Manifest.load(model).node_shards) != node_shards:
        raise TestnetError(f"{model} does not have {node_shards} node shards: use another --dir, "
                           f"or delete {root} to re-import")
    if deploy.exists():
        shutil.rmtree(deploy)
    log(f"encrypting the node shards into {deploy} (fresh key)")
    encrypt_model_dir(model, deploy, progress=log)
    return model, deploy


class Testnet:
    """N local node processes serving one encrypted deployment; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, dir: Path | str = DEFAULT_DIR, nodes: int = 3, replicas: int = 1,
                 node_shards: int | None = None, *, deployment: Path | str | None = None,
                 model: Path | str | None = None, node_args: Iterable[str] = (),
                 timeout: float = 60.0, log: Callable[[str], None] = _stderr_log) -> None:
        if nodes < 1:
            raise TestnetError("a testnet needs at least one node")
        if replicas > nodes or replicas < 1:
            place_shards([], nodes, replicas)  # raises the explanation
        self.root = Path(dir).absolute()
        self.n = nodes
        self.replicas = replicas
        self.node_shards = node_shards
        self.deployment: Path | None = Path(deployment).absolute() if deployment else None
        self.model: Path | None = Path(model).absolute() if model else None
        self.node_args = [str(a) for a in node_args]
        self.timeout = timeout
        self.log = log
        self.nodes: list[NodeInfo] = []
        self.placement: dict[str, list[int]] = {}
        self.shard_index: dict[str, int] = {}  # CID -> manifest shard index
        self._lock: IO[str] | None = None
        self._log_files: list[IO[bytes]] = []
        self._started = False

    # -- properties ------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def bootstrap(self) -> str:
        if not self.nodes or not self.nodes[0].multiaddrs:
            raise TestnetError("the testnet is not running")
        return self.nodes[0].multiaddr

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Testnet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Testnet:
        """Prepare the model, place the shards, start every node and wait until all are up."""
        if self._started:
            raise TestnetError("this testnet is already started")
        began = time.monotonic()
        self._started = True
        try:
            self._take_lock()
            self._prepare()
            self._start_all()
            self._write_state()
        except BaseException:
            self.stop()
            raise
        self.log(f"{self.n} node(s) up in {time.monotonic() - began:.1f} s")
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 5 s) and remove testnet.json.

        Safe to call more than once, and after a failed start."""
        procs = [n for n in self.nodes if n.proc is not None]
        for node in procs:
            _signal(node.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for node in procs:
            assert node.proc is not None
            try:
                node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"node {node.index} (pid {node.proc.pid}) did not stop within "
                         f"{STOP_GRACE:g} s; killing it")
                _signal(node.proc, signal.SIGKILL)
                node.proc.wait()
        for node in self.nodes:
            if node.proc is not None:
                # a node that was killed cannot remove its own ready file
                (node.data_dir / "node.json").unlink(missing_ok=True)
                node.proc = None
        for f in self._log_files:
            f.close()
        self._log_files.clear()
        if self._lock is not None:
            self.state_file.unlink(missing_ok=True)
            self._lock.close()  # releases the flock
            self._lock = None
        self._started = False

    def stop_node(self, index: int, *, kill: bool = False, timeout: float = STOP_GRACE) -> int:
        """Stop one node: SIGTERM (a clean stop), or SIGKILL with ``kill=True`` (a crash).

        Returns its exit code. The other nodes keep running; node 0 forgets the stopped node only
        when its peer entry expires (about 45 s), so clients will still try it and move on."""
        node = self.nodes[index]
        if node.proc is None:
            raise TestnetError(f"node {index} is not running")
        _signal(node.proc, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            code = node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(node.proc, signal.SIGKILL)
            code = node.proc.wait()
        node.proc = None
        (node.data_dir / "node.json").unlink(missing_ok=True)
        self._write_state()
        return code

    def start_node(self, index: int) -> NodeInfo:
        """(Re)start one stopped node with its identity and shards; waits until it is up."""
        node = self.nodes[index]
        if node.alive:
            raise TestnetError(f"node {index} is already running")
        bootstrap = None if index == 0 else self.bootstrap
        self._spawn(node, bootstrap)
        deadline = time.monotonic() + self.timeout
        self._wait_ready(node, deadline)
        if index != 0 and self.nodes[0].alive:
            self._wait_peers([node], deadline)
        self._write_state()
        return node

    # -- status ----------------------------------------------------------------------------------

    def log_tail(self, index: int, lines: int = 20) -> str:
        try:
            text = self.nodes[index].log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "deployment": str(self.deployment), "model": str(self.model) if self.model else None,
            "bootstrap": self.bootstrap, "pid": os.getpid(),
            "placement": {cid: idx for cid, idx in self.placement.items()},
        }

    def summary(self) -> str:
        from models import Manifest

        manifest = Manifest.load(self.deployment)  # type: ignore[arg-type]
        lines = [
            f"veilnet testnet: {self.n} node(s) on 127.0.0.1, each node shard on "
            f"{self.replicas} node(s)",
            f"  deployment  {self.deployment}",
            f"              manifest {manifest.cid}, {len(manifest.node_shards)} node shards, "
            f"encryption {manifest.encryption}",
            f"  bootstrap   {self.bootstrap}",
            f"  state       {self.state_file}",
            "",
            f"  {'node':<5}{'pid':<9}{'peer id':<20}{'http':<25}shards (index)",
        ]
        for n in self.nodes:
            held = " ".join(str(self.shard_index[c]) for c in n.shards) or "-"
            state = "" if n.alive else "  (stopped)"
            lines.append(f"  {n.index:<5}{n.pid or '-':<9}{short(n.peer_id):<20}"
                         f"{n.http or '-':<25}{held}{state}")
        return "\n".join(lines)

    # -- internals -------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ignore = self.root / ".gitignore"  # the directory is scratch: keep it out of git
        if not ignore.exists():
            ignore.write_text("*\n")
        lock = open(self.root / LOCK_FILE, "w")  # noqa: SIM115 (held until stop())
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise TestnetError(f"another testnet is running in {self.root} (see "
                               f"{self.state_file}); stop it or use another --dir") from None
        self._lock = lock
        self.state_file.unlink(missing_ok=True)  # left by a testnet that was SIGKILLed

    def _prepare(self) -> None:
        from models import Manifest
        from node.store import ShardStore

        if self.deployment is None:
            self.model, self.deployment = prepare_model(self.root, self.node_shards, self.log)
        manifest = Manifest.load(self.deployment)
        shards = manifest.node_shards
        if self.node_shards is not None and len(shards) != self.node_shards:
            raise TestnetError(f"{self.deployment} has {len(shards)} node shards, not "
                               f"{self.node_shards}")
        self.shard_index = {s.cid: s.index for s in shards}
        self.placement = place_shards([s.cid for s in shards], self.n, self.replicas)
        self.nodes = []
        for i in range(self.n):
            data_dir = self.root / "nodes" / f"node{i}"
            # keep identity.key (stable PeerIDs across runs); redo the placement from scratch
            for sub in ("shards", "deployments"):
                shutil.rmtree(data_dir / sub, ignore_errors=True)
            (data_dir / "node.json").unlink(missing_ok=True)
            mine = [cid for cid, where in self.placement.items() if i in where]
            store = ShardStore(data_dir)
            if mine:
                store.add_deployment(self.deployment, only=mine)
            self.nodes.append(NodeInfo(i, data_dir, data_dir / "node.log", mine))

    def _start_all(self) -> None:
        deadline = time.monotonic() + self.timeout
        first = self.nodes[0]
        self._spawn(first, None)
        self._wait_ready(first, deadline)
        for node in self.nodes[1:]:
            self._spawn(node, first.multiaddr)
        for node in self.nodes[1:]:
            self._wait_ready(node, deadline)
        self._wait_peers(self.nodes[1:], deadline)

    def _spawn(self, node: NodeInfo, bootstrap: str | None) -> None:
        (node.data_dir / "node.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "node", "node", "start",
               "--data-dir", str(node.data_dir), "--listen", LISTEN, "--http", HTTP]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        cmd += self.node_args
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        logf = open(node.log, "ab")  # noqa: SIM115 (closed in stop())
        self._log_files.append(logf)
        logf.write(f"--- testnet: {' '.join(cmd)}\n".encode())
        logf.flush()
        node.pid = node.peer_id = node.did = node.http = None
        node.multiaddrs = []
        node.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()))
        node.pid = node.proc.pid

    def _fail(self, node: NodeInfo, why: str) -> TestnetError:
        return TestnetError(f"node {node.index} (pid {node.pid}, {node.data_dir}) {why}\n"
                            f"--- last lines of {node.log}:\n{self.log_tail(node.index)}")

    def _wait_ready(self, node: NodeInfo, deadline: float) -> None:
        """Wait for node.json (written by this very process) and a healthy /healthz."""
        ready = node.data_dir / "node.json"
        assert node.proc is not None
        while True:
            code = node.proc.poll()
            if code is not None:
                raise self._fail(node, f"exited with code {code} before it was ready")
            info = _read_json(ready)
            if info is not None and info.get("pid") == node.proc.pid:
                node.peer_id, node.did = info["peer_id"], info["did"]
                node.multiaddrs, node.http = list(info["multiaddrs"]), info["http"]
                health = _http_json(f"{node.http}/healthz")
                if isinstance(health, dict) and health.get("peer_id") == node.peer_id:
                    return
            if time.monotonic() > deadline:
                what = "answered no /healthz" if info else "wrote no node.json"
                raise self._fail(node, f"{what} within {self.timeout:g} s")
            time.sleep(0.1)

    def _wait_peers(self, nodes: Sequence[NodeInfo], deadline: float) -> None:
        """Wait until node 0's /v1/peers lists each of ``nodes`` with the shards placed on it."""
        first = self.nodes[0]
        while True:
            known = {p.get("peer_id"): p for p in _http_json(f"{first.http}/v1/peers") or []
                     if isinstance(p, dict)}
            # the same shards and this run's addresses (a restarted node keeps its PeerID)
            missing = [n for n in nodes
                       if n.peer_id not in known
                       or sorted(known[n.peer_id].get("shards") or []) != sorted(n.shards)
                       or not set(known[n.peer_id].get("addrs") or []) & set(n.multiaddrs)]
            if not missing:
                return
            for n in missing:
                assert n.proc is not None
                if n.proc.poll() is not None:
                    raise self._fail(n, f"exited with code {n.proc.returncode}")
            if time.monotonic() > deadline:
                raise self._fail(missing[0], f"is not known to node 0 ({first.http}/v1/peers) "
                                             f"after {self.timeout:g} s")
            time.sleep(0.1)

    def _write_state(self) -> None:
        if self._lock is None:
            return
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, self.state_file)


# -- helpers -------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return setup


def _signal(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _http_json(url: str, timeout: float = 2.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def short(peer_id: str | None) -> str:
    return f"{peer_id[:8]}…{peer_id[-6:]}" if peer_id else "-"


class _Stop(BaseException):
    """Raised in the main thread by the first SIGINT/SIGTERM."""


def _install_stop_handlers() -> Callable[[], None]:
    """SIGINT/SIGTERM raise _Stop once; later signals are ignored while we clean up.

    Returns a function that marks cleanup as started (so no signal interrupts it)."""
    state = {"stopping": False}

    def handler(signum: int, frame: object) -> None:
        if not state["stopping"]:
            state["stopping"] = True
            raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: state.__setitem__("stopping", True)


# -- commands ------------------------------------------------------------------------------------


def _net_from_args(args: argparse.Namespace) -> Testnet:
    if args.model and not args.deployment:
        raise TestnetError("--model goes with --deployment")
    node_args: list[str] = []
    if args.threads is not None:
        node_args += ["--threads", str(args.threads)]
    if args.capacity is not None:
        node_args += ["--capacity", str(args.capacity)]
    return Testnet(args.dir, args.nodes, args.replicas, args.node_shards,
                   deployment=args.deployment, model=args.model, node_args=node_args,
                   timeout=args.timeout)


def cmd_up(args: argparse.Namespace) -> int:
    cleaning = _install_stop_handlers()
    net = _net_from_args(args)
    reported: set[int] = set()
    try:
        net.start()
        print(net.summary())
        print()
        print("  try:  .venv/bin/veilnet query --bootstrap " + net.bootstrap
              + f" --deployment {net.deployment} \"A man is eating food.\"")
        print(f"  stop: Ctrl-C, or kill {os.getpid()}", flush=True)
        while True:
            for node in net.nodes:  # report nodes that die while the testnet runs
                if node.proc is not None and node.proc.poll() is not None \
                        and node.index not in reported:
                    reported.add(node.index)
                    net.log(f"node {node.index} (pid {node.pid}) exited with code "
                            f"{node.proc.returncode}; see {node.log}")
            time.sleep(0.5)
    except _Stop as stop:
        net.log(f"{stop}: stopping {net.n} node(s)")
    finally:
        cleaning()
        net.stop()
    net.log("stopped")
    return 0


DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Encrypted inference keeps activations private.",
]
DEMO_PAIRS = [(0, 1, "similar"), (0, 2, "different"), (2, 3, "different")]
TOLERANCE = 1e-4


def _print_hops(hops: Sequence[Any], net: Testnet) -> None:
    by_peer = {n.peer_id: n.index for n in net.nodes}
    print(f"    {'shard':<7}{'node':<6}{'peer id':<20}{'latency':>10}  signature  tries")
    for h in hops:
        sig = "verified" if h.signature_verified else "NOT VERIFIED"
        print(f"    {h.shard_index:<7}{by_peer.get(h.peer_id, '?')!s:<6}{short(h.peer_id):<20}"
              f"{h.latency_ms:>8.1f}ms  {sig:<10} {h.attempts}")
        for failure in h.failures:
            peer, _, reason = failure.partition(": ")
            reason = reason.replace(peer, short(peer)).split(": /")[0]  # drop the address
            print(f"           tried node {by_peer.get(peer, '?')} first: {reason[:72]}")


def _compare(embeddings: Any, reference: Any) -> tuple[float, Any]:
    import numpy as np

    diff = float(np.abs(embeddings - reference).max())
    cos = np.sum(embeddings * reference, axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
    return diff, cos


def _demo_query(net: Testnet, texts: Sequence[str], reference: Any, title: str,
                detail: bool = True) -> float:
    from client import Client

    print(f"\n{title}")
    started = time.perf_counter()
    with Client([net.bootstrap], net.deployment) as client:  # type: ignore[arg-type]
        result = client.embed(texts)
    elapsed = time.perf_counter() - started
    diff, cos = _compare(result.embeddings, reference)
    print(f"  {len(texts)} sentences in {elapsed * 1000:.0f} ms (client start included); "
          f"hops:")
    _print_hops(result.hops, net)
    if not detail:
        if all(h.attempts == 1 for h in result.hops):
            print("  (this client happened to pick live nodes first: no hop needed a retry)")
        print(f"  max |network - plaintext| {diff:.2e}, min cosine {cos.min():.7f}")
        return diff
    print(f"  {'sentence':<50}{'max |net - plain|':>18}{'cosine':>11}")
    for i, text in enumerate(texts):
        d = float(abs(result.embeddings[i] - reference[i]).max())
        print(f"  s{i} {text[:46]:<47}{d:>18.2e}{cos[i]:>11.7f}")
    sims = result.embeddings @ result.embeddings.T
    plain = reference @ reference.T
    for a, b, kind in DEMO_PAIRS:
        print(f"  similarity s{a}~s{b} ({kind}): network {sims[a, b]:.4f}, "
              f"plaintext {plain[a, b]:.4f}")
    return diff


def cmd_demo(args: argparse.Namespace) -> int:
    cleaning = _install_stop_handlers()
    if args.deployment and not args.model:
        _stderr_log("error: the demo compares with the plaintext model: give --model too")
        return 2
    net = _net_from_args(args)
    worst = 0.0
    try:
        net.start()
        print(net.summary())
        import logging

        from models import Pipeline
        from node.p2p import quiet_libraries

        quiet_libraries()  # failed dials are shown in the hop table instead
        logging.getLogger("veilnet.client").setLevel(logging.ERROR)

        assert net.model is not None
        reference = Pipeline(net.model).embed(DEMO_SENTENCES)
        print("\nThe client keeps the key (deploy/client/); nodes hold only encrypted node "
              "shards.\nEach answer is compared with the plaintext model run in this process.")
        worst = max(worst, _demo_query(net, DEMO_SENTENCES, reference,
                                       "Query 1: encrypted embeddings through the network"))
        victim = _crash_candidate(net)
        if victim is not None:
            net.stop_node(victim, kill=True)
            print(f"\nNode {victim} crashed (SIGKILL). Node 0 still lists it until its entry "
                  "expires,\nso a client may try it first and retry the hop on another replica.")
            worst = max(worst, _demo_query(net, DEMO_SENTENCES, reference,
                                           f"Query 2: with node {victim} down",
                                           detail=False))
    except _Stop as stop:
        net.log(f"{stop}: stopping")
        return 130
    finally:
        cleaning()
        net.stop()
    ok = worst <= TOLERANCE
    print(f"\nmax |network - plaintext| over all queries: {worst:.2e} "
          f"({'ok' if ok else 'FAIL'}: tolerance {TOLERANCE:g}); all nodes stopped")
    return 0 if ok else 1


def _crash_candidate(net: Testnet) -> int | None:
    """A node other than the bootstrap node whose shards all have another live replica."""
    for node in reversed(net.nodes[1:]):
        if node.shards and all(any(j != node.index for j in net.placement[c])
                               for c in node.shards):
            return node.index
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testnet.py",
        description="Run a local veilnet testnet: node processes on 127.0.0.1 serving an "
                    "encrypted all-MiniLM-L6-v2 deployment.",
        epilog="Python: sys.path.insert(0, 'scripts'); from testnet import Testnet "
               "(see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, nodes: int, replicas: int) -> None:
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="T",
                       help=f"work directory: model/, deploy/, nodes/node<i>/, {STATE_FILE} "
                            f"(default {DEFAULT_DIR}/)")
        p.add_argument("--nodes", type=int, default=nodes, metavar="N",
                       help=f"number of node processes (default {nodes})")
        p.add_argument("--replicas", type=int, default=replicas, metavar="R",
                       help=f"nodes per node shard, placed round robin; at most N "
                            f"(default {replicas})")
        p.add_argument("--node-shards", type=int, default=None, metavar="K",
                       help=f"node shards when MiniLM is imported (default "
                            f"{DEFAULT_NODE_SHARDS}; an existing T/deploy must match)")
        p.add_argument("--deployment", type=Path, metavar="DEPLOY",
                       help="use this encrypted deployment instead of T/deploy (nothing is "
                            "imported)")
        p.add_argument("--model", type=Path, metavar="DIR",
                       help="the plaintext model DEPLOY was encrypted from (with --deployment)")
        p.add_argument("--threads", type=int, metavar="NUM",
                       help="onnxruntime threads per shard run on each node (node --threads)")
        p.add_argument("--capacity", type=int, metavar="C",
                       help="shard runs at once per node (node --capacity)")
        p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="limit for all nodes to come up (default 60)")

    up = sub.add_parser(
        "up", help="start a testnet and run until Ctrl-C / SIGTERM",
        description="Import and encrypt MiniLM into T (first run only), place each node shard "
                    "on R nodes, start N nodes (node 0 first, the others bootstrapping from "
                    f"it), wait until all are up, write T/{STATE_FILE}, print a summary and run "
                    "until SIGINT or SIGTERM; then stop every node and remove "
                    f"T/{STATE_FILE}. Node logs: T/nodes/node<i>/node.log.")
    common(up, nodes=3, replicas=1)
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser(
        "demo", help="start a testnet, run encrypted queries, stop it (make demo)",
        description="Start a testnet (as 'up'), embed a few sentences through it with the "
                    "client SDK, print each answer beside the plaintext model's and the node "
                    "that served each hop, crash one node and query again, then stop every "
                    f"node. Exits 1 if any embedding differs from the plaintext one by more "
                    f"than {TOLERANCE:g}.")
    common(demo, nodes=3, replicas=2)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from client import QueryError
    from models import ModelSourceError

    try:
        return int(args.func(args))  # every node is stopped before an error gets here
    except (TestnetError, ValueError, ModelSourceError, QueryError) as exc:
        _stderr_log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
