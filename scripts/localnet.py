"""Local veilnet testnets as a library: start N node processes on 127.0.0.1 serving an encrypted
MiniLM (or SmolLM2) deployment, wait until they are up, stop them without leaving orphans.

Python API (e.g. bench/e2e.py: ``sys.path.insert(0, "scripts"); from localnet import Testnet``)::

    with Testnet("testnet-data", nodes=3, replicas=1, node_shards=3,
                 node_args=["--threads", "1"]) as net:
        net.bootstrap       # node 0's multiaddr (/ip4/127.0.0.1/tcp/.../p2p/<PeerID>)
        net.deployment      # Path of the encrypted deployment (give it to client.Client)
        net.model           # Path of the plaintext model dir (None if not known)
        net.nodes           # list[NodeInfo]: index, pid, peer_id, did, multiaddrs, http,
                            #   data_dir, shards (CIDs), log, alive
        net.placement       # {shard CID: [node indexes]}
        net.discovery_s     # seconds from spawning nodes 1..N-1 (or a restarted node) until
                            #   every node had indexed every node's card
        net.ready_s         # seconds from spawning nodes 1..N-1 until all were ready
        net.stop_node(2)              # SIGTERM one node (kill=True: SIGKILL, like a crash)
        net.start_node(2)             # start it again (same identity, same shards)
        net.log_tail(2)               # last lines of its node.log

``Testnet(dir, nodes=3, replicas=1, node_shards=None, *, deployment=None, model=None, node_args=(),
ledger_nodes=(0,), byzantine=0, byzantine_mode="noise", kind="minilm", hosts=None,
launcher=None, timeout=60.0, log=<stderr>, progress=log)``: ``deployment``/``model`` reuse
existing directories instead of T/deploy and T/model; ``kind="smollm2"`` imports and encrypts
SmolLM2-135M-Instruct instead of MiniLM (into T/smollm2/); ``node_shards`` (default 3) only
matters when a model has to be imported; ``node_args`` are appended to every ``veilnet node
start`` (e.g. ``--threads 1``, ``--capacity 2``); ``hosts`` gives node i an IPv4 address to
listen on (libp2p and HTTP) instead of 127.0.0.1, and ``launcher(node, cmd)`` returns the
command that runs ``cmd`` (e.g. prefixed with ``ip netns exec NS``: scripts/netem.py runs each
node in a network namespace); the nodes in ``ledger_nodes`` also keep a ledger (``--ledger``;
every node is a witness); ``timeout`` bounds the start-up; ``log`` gets events (a node killed
on stop), ``progress`` the start-up steps (import, encrypt, nodes up, cards seen: with a
``models.progress.Reporter``, as bars too). ``start()``/``stop()`` can be called instead of
``with``; ``stop()`` is idempotent. Any failure while starting stops every process started so far
and raises ``TestnetError`` naming the node and quoting the tail of its log.

No orphans: nodes run in their own session (a terminal's Ctrl-C reaches only this script, which
stops them in order) and, on Linux, with PR_SET_PDEATHSIG=SIGTERM, so they stop even if this
process is SIGKILLed. The death signal follows the *thread* that started the node: start and stop
a testnet from one long-lived thread (normally the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
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
from urllib.parse import urlsplit

from errors import UnavailableError
from models.progress import Progress, counted

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path("testnet-data")
DEFAULT_NODE_SHARDS = 3
LOOPBACK = "127.0.0.1"  # where nodes listen unless Testnet(hosts=...) says otherwise
STATE_FILE = "testnet.json"
LOCK_FILE = "testnet.lock"
STOP_GRACE = 5.0

PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


class TestnetError(UnavailableError, RuntimeError):
    """The testnet could not be set up or started; the message says which node and why."""

    __test__ = False  # not a pytest test class


def stderr_log(message: str) -> None:
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
    byzantine: str | None = None  # --byzantine-test-mode of this node, if any
    host: str = LOOPBACK  # the IPv4 address it listens on (libp2p and HTTP)
    exit_code: int | None = None  # how its last process ended, once it has
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def multiaddr(self) -> str:
        """The node's multiaddr on its host address, ending in /p2p/<PeerID>."""
        for addr in self.multiaddrs:
            if addr.startswith(f"/ip4/{self.host}/"):
                return addr
        if not self.multiaddrs:
            raise TestnetError(f"node {self.index} has no multiaddr (is it running?)")
        return self.multiaddrs[0]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid if self.alive else None,
                "exit_code": self.exit_code, "did": self.did, "peer_id": self.peer_id,
                "multiaddrs": self.multiaddrs, "http": self.http,
                "data_dir": str(self.data_dir), "shards": self.shards, "log": str(self.log),
                "alive": self.alive, "byzantine": self.byzantine is not None,
                "byzantine_mode": self.byzantine}


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


MODELS = ("minilm", "smollm2")  # what a testnet imports and encrypts by itself
SCHEMES = ("ee", "masked")  # veilnet model encrypt --scheme


def prepare_model(root: Path, node_shards: int | None, log: Callable[[str], None],
                  kind: str = "minilm", scheme: str = "ee") -> tuple[Path, Path]:
    """T/model and T/deploy (for SmolLM2: T/smollm2/model and T/smollm2/deploy; with
    ``scheme="masked"``: T/deploy-masked), importing and encrypting the model if the
    deployment is not there yet."""
    from models import Manifest, encrypt_model_dir, import_minilm, import_smollm2

    if kind not in MODELS:
        raise TestnetError(f"unknown model {kind!r}: use one of {', '.join(MODELS)}")
    if scheme not in SCHEMES:
        raise TestnetError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if scheme == "masked" and kind != "minilm":
        raise TestnetError("--scheme masked covers the MiniLM encoder only")
    base = root / "smollm2" if kind == "smollm2" else root
    model, deploy = base / "model", base / ("deploy-masked" if scheme == "masked" else "deploy")
    if (deploy / "manifest.json").is_file():
        have = len(Manifest.load(deploy).node_shards)
        if node_shards is not None and have != node_shards and scheme == "ee":
            raise TestnetError(f"{deploy} has {have} node shards, not {node_shards}: use another "
                               f"--dir, or delete {base} to re-import")
        return model, deploy
    if not (model / "manifest.json").is_file():
        if model.exists():
            shutil.rmtree(model)  # an import that did not finish
        k = node_shards or DEFAULT_NODE_SHARDS
        if kind == "smollm2":
            log(f"importing SmolLM2-135M-Instruct into {model} ({k} node shards)")
            import_smollm2(model, node_shards=k, progress=log)
        else:
            log(f"importing all-MiniLM-L6-v2 into {model} ({k} node shards)")
            import_minilm(model, node_shards=k, progress=log)
    elif node_shards is not None and len(Manifest.load(model).node_shards) != node_shards:
        raise TestnetError(f"{model} does not have {node_shards} node shards: use another --dir, "
                           f"or delete {base} to re-import")
    if deploy.exists():
        shutil.rmtree(deploy)
    log(f"encrypting the node shards into {deploy} ({scheme} scheme)")
    encrypt_model_dir(model, deploy, progress=log, scheme=scheme)
    return model, deploy


class Testnet:
    """N local node processes serving one encrypted deployment; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, dir: Path | str = DEFAULT_DIR, nodes: int = 3, replicas: int = 1,
                 node_shards: int | None = None, *, deployment: Path | str | None = None,
                 model: Path | str | None = None, node_args: Iterable[str] = (),
                 ledger_nodes: Iterable[int] = (0,), byzantine: int = 0,
                 byzantine_mode: str = "noise", kind: str = "minilm", scheme: str = "ee",
                 args_for: Callable[[NodeInfo], Sequence[str]] | None = None,
                 hosts: Sequence[str] | None = None,
                 launcher: Callable[[NodeInfo, list[str]], list[str]] | None = None,
                 timeout: float = 60.0, log: Callable[[str], None] = stderr_log,
                 progress: Progress | None = None) -> None:
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
        # arguments for one node only (e.g. --record-received into its own data directory)
        self.args_for = args_for
        if hosts is not None and len(hosts) != nodes:
            raise TestnetError(f"{len(hosts)} host address(es) for {nodes} node(s)")
        self.hosts = list(hosts) if hosts is not None else [LOOPBACK] * nodes
        self.launcher = launcher  # wraps a node's command (e.g. ip netns exec NS ...)
        self.ledger_nodes = sorted(set(ledger_nodes))  # started with --ledger
        if not 0 <= byzantine < nodes:
            raise TestnetError(f"--byzantine {byzantine}: between 0 and {nodes - 1} (node 0, "
                               "the bootstrap node, stays honest)")
        self.byzantine, self.byzantine_mode = byzantine, byzantine_mode
        self.kind = kind  # the model imported when no deployment is given
        self.scheme = scheme  # how it is encrypted: "ee" or "masked" (masked/1)
        self.timeout = timeout
        self.log = log
        self.progress = progress if progress is not None else log  # start-up steps and bars
        self.nodes: list[NodeInfo] = []
        self.placement: dict[str, list[int]] = {}
        self.shard_index: dict[str, int] = {}  # CID -> manifest shard index
        self._lock: IO[str] | None = None
        self._log_files: list[IO[bytes]] = []
        self._started = False
        self.discovery_s: float | None = None  # last wait until every node had every card
        self.ready_s: float | None = None  # from spawning nodes 1..N-1 until all were ready

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
        self.progress(f"{self.n} node(s) up in {time.monotonic() - began:.1f} s")
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
        node.proc, node.exit_code = None, code
        (node.data_dir / "node.json").unlink(missing_ok=True)
        self._write_state()
        return code

    def reap(self) -> list[NodeInfo]:
        """Nodes whose process has ended since the last look (a crash, or a kill from outside):
        each is marked stopped with its exit code, its ready file removed, and testnet.json
        rewritten, so the state file never lists a dead node as alive."""
        ended = []
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                node.exit_code = node.proc.returncode
                node.proc = None
                (node.data_dir / "node.json").unlink(missing_ok=True)
                ended.append(node)
        if ended:
            self._write_state()
        return ended

    def start_node(self, index: int, *, wait_peers: bool = True) -> NodeInfo:
        """(Re)start one stopped node with its identity, shards and addresses (the ports of its
        last run); waits until it answers /healthz and, unless ``wait_peers`` is False (a
        caller that keeps other nodes frozen or down), until every running node has its card."""
        node = self.nodes[index]
        if node.alive:
            raise TestnetError(f"node {index} is already running")
        bootstrap = None if index == 0 else self.bootstrap
        spawned = time.monotonic()
        self._spawn(node, bootstrap)
        deadline = spawned + self.timeout
        self._wait_ready(node, deadline)
        if wait_peers and index != 0 and self.nodes[0].alive:
            self._wait_peers([n for n in self.nodes if n.alive], deadline, since=spawned)
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
            "discovery_s": self.discovery_s, "ledger_nodes": self.ledger_nodes,
        }

    def summary(self) -> str:
        from models import Manifest

        manifest = Manifest.load(self.deployment)  # type: ignore[arg-type]
        lines = [
            f"veilnet testnet: {self.n} node(s) on {_where(self.hosts)}, each node shard on "
            f"{self.replicas} node(s)",
            f"  deployment  {self.deployment}",
            f"              manifest {manifest.cid}, {len(manifest.node_shards)} node shards, "
            f"encryption {manifest.encryption}",
            f"  bootstrap   {self.bootstrap} (the only address any node was given)",
            f"  discovery   every node had every node's signed card "
            f"{self.discovery_s} s after nodes 1..{self.n - 1} were started",
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
            self.model, self.deployment = prepare_model(self.root, self.node_shards,
                                                        self.progress, self.kind, self.scheme)
        manifest = Manifest.load(self.deployment)
        shards = manifest.node_shards
        if self.node_shards is not None and len(shards) != self.node_shards:
            raise TestnetError(f"{self.deployment} has {len(shards)} node shards, not "
                               f"{self.node_shards}")
        self.shard_index = {s.cid: s.index for s in shards}
        self.placement = place_shards([s.cid for s in shards], self.n, self.replicas)
        self.progress(f"placing {len(shards)} node shard(s) on {self.replicas} of {self.n} "
                      "node(s) each")
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
            liar = self.byzantine_mode if i >= self.n - self.byzantine else None
            self.nodes.append(NodeInfo(i, data_dir, data_dir / "node.log", mine, byzantine=liar,
                                       host=self.hosts[i]))

    def _start_all(self) -> None:
        deadline = time.monotonic() + self.timeout
        first = self.nodes[0]
        self.progress(f"starting node 0 (the bootstrap node), then {self.n - 1} more")
        with counted(self.progress, "nodes ready", self.n, "nodes") as ready:
            self._spawn(first, None)
            self._wait_ready(first, deadline)
            ready.advance()
            spawned = time.monotonic()
            for node in self.nodes[1:]:
                self._spawn(node, first.multiaddr)
            for node in self.nodes[1:]:
                self._wait_ready(node, deadline)
                ready.advance()
        self.ready_s = round(time.monotonic() - spawned, 3)
        self._wait_peers(self.nodes, deadline, since=spawned)

    def _spawn(self, node: NodeInfo, bootstrap: str | None) -> None:
        (node.data_dir / "node.json").unlink(missing_ok=True)
        tcp, http = _last_ports(node)  # 0 on a first start: any free port
        cmd = [sys.executable, "-m", "node", "node", "start",
               "--data-dir", str(node.data_dir), "--listen", f"/ip4/{node.host}/tcp/{tcp}",
               "--http", f"{node.host}:{http}"]
        if bootstrap:
            cmd += ["--bootstrap", bootstrap]
        if node.index in self.ledger_nodes:
            cmd.append("--ledger")
        if node.byzantine:
            cmd += ["--byzantine-test-mode", node.byzantine]
        cmd += self.node_args
        if self.args_for is not None:
            cmd += [str(a) for a in self.args_for(node)]
        if self.launcher is not None:
            cmd = self.launcher(node, cmd)
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
                health = http_json(f"{node.http}/healthz")
                if isinstance(health, dict) and health.get("peer_id") == node.peer_id:
                    return
            if time.monotonic() > deadline:
                what = "answered no /healthz" if info else "wrote no node.json"
                raise self._fail(node, f"{what} within {self.timeout:g} s")
            time.sleep(0.1)

    def _wait_peers(self, nodes: Sequence[NodeInfo], deadline: float,
                    since: float | None = None) -> None:
        """Wait until every running node's card index (/v1/agents) holds a card of each of
        ``nodes`` with the shards placed on it and this run's addresses: discovery by signed
        cards alone, from the one bootstrap address each node was given. Sets discovery_s:
        seconds from ``since`` (default: now) until then."""
        started = time.monotonic() if since is None else since
        viewers = [v for v in self.nodes if v.alive and v.http is not None]
        with counted(self.progress, "cards seen", len(viewers) * len(nodes), "cards") as seen:
            while True:
                missing = self._missing_cards(nodes)
                seen.set(len(viewers) * len(nodes) - len(missing))
                if not missing:
                    self.discovery_s = round(time.monotonic() - started, 3)
                    return
                for _, n in missing:
                    assert n.proc is not None
                    if n.proc.poll() is not None:
                        raise self._fail(n, f"exited with code {n.proc.returncode}")
                if time.monotonic() > deadline:
                    viewer, n = missing[0]
                    raise self._fail(n, f"has no current card at node {viewer.index} "
                                        f"({viewer.http}/v1/agents) after {self.timeout:g} s")
                time.sleep(0.1)

    def _missing_cards(self, nodes: Sequence[NodeInfo]) -> list[tuple[NodeInfo, NodeInfo]]:
        """(viewer, node) for each running viewer whose card index lacks ``node``'s card."""
        missing: list[tuple[NodeInfo, NodeInfo]] = []
        for viewer in self.nodes:
            if not viewer.alive or viewer.http is None:
                continue
            known = {}
            for card in http_json(f"{viewer.http}/v1/agents") or []:
                params = _veilnet_params(card)
                known[params.get("peerId")] = params
            missing += [(viewer, n) for n in nodes if not _card_matches(known.get(n.peer_id), n)]
        return missing

    def _write_state(self) -> None:
        if self._lock is None:
            return
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, self.state_file)


# -- helpers -------------------------------------------------------------------------------------


def _veilnet_params(card: Any) -> dict[str, Any]:
    from registry.card import CardRejected, extension_params

    try:
        return extension_params(card)
    except (CardRejected, AttributeError):
        return {}


def _card_matches(params: dict[str, Any] | None, node: NodeInfo) -> bool:
    """The card names the shards placed on ``node`` and its addresses of this run (a restarted
    node keeps its PeerID)."""
    if not params:
        return False
    shards = [s.get("cid") for d in params.get("deployments") or []
              for s in d.get("shards") or []]
    return (sorted(shards) == sorted(node.shards)
            and bool(set(params.get("multiaddrs") or []) & set(node.multiaddrs)))


def _where(hosts: Sequence[str]) -> str:
    return hosts[0] if len(set(hosts)) == 1 else f"{hosts[0]}..{hosts[-1]}"


def _last_ports(node: NodeInfo) -> tuple[int, int]:
    """The libp2p and HTTP ports of the node's last run (0 when it never ran), so a restarted
    node is found where its peers and clients last saw it."""
    found = re.search(r"/tcp/(\d+)", node.multiaddr) if node.multiaddrs else None
    http = urlsplit(node.http).port if node.http else None
    return int(found.group(1)) if found else 0, http or 0


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


def http_json(url: str, timeout: float = 2.0) -> Any:
    """The JSON a node's HTTP API answers at ``url``, or None if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[str]:
    """``"<pid>: <command line>"`` of the live processes whose arguments contain ``text``, e.g.
    a testnet directory: what a stopped testnet must not leave. This process and its ancestors
    (``timeout 900 chaos.py --dir T``, a shell) are not leftovers."""
    found, mine, pid = [], set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(proc.name)):
            found.append(f"{proc.name}: {cmdline}")
    return found


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` in MB (from /proc), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def metric_samples(node: NodeInfo, name: str, timeout: float = 10.0,
                   ) -> list[tuple[dict[str, str], float]]:
    """The samples of ``name`` (e.g. ``veilnet_busy_total``) on ``node``'s /metrics, as
    (labels, value); empty when the node does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{node.http}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return []
    return [(dict(s.labels), float(s.value)) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def short(peer_id: str | None) -> str:
    return f"{peer_id[:8]}…{peer_id[-6:]}" if peer_id else "-"
