"""Helpers for tests that run real ``veilnet node start`` processes and talk to them over libp2p.

Nothing here fakes a veilnet component: nodes are subprocesses started exactly as a user would
start them, and the test side is a real py-libp2p host (TCP, Noise, yamux) built with
``protocols.transport.make_host``. Tests drive trio with ``trio.run`` (pytest-trio is not
installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from prometheus_client.parser import text_string_to_metric_families

from crypto.identity import Identity
from node.cli import main as veilnet_main
from protocols.transport import close_quietly, connect, make_host, peer_info
from protocols.wire import read_frame

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an async function to completion under trio (what pytest-trio would do)."""
    return trio.run(fn, *args)


@dataclass
class NodeProcess:
    """A running ``veilnet node start`` subprocess and the facts from its D/node.json."""

    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any]

    @property
    def addr(self) -> str:
        return str(self.info["multiaddrs"][0])

    @property
    def http(self) -> str:
        return str(self.info["http"])

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``. Returns the exit code."""
        return stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return proc.returncode


def wait_for(check: Callable[[], Any], what: str, timeout: float = 15.0,
             interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(interval)


def node_command(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "node", "node", "start", "--data-dir", str(data_dir),
            "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", *extra]


def spawn_node(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(node_command(data_dir, *extra), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log_path


def start_node(data_dir: Path, *extra: str, ready_timeout: float = 60.0) -> NodeProcess:
    """Start a node and wait (bounded) for its D/node.json; fails with the node's log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc, log_path = spawn_node(data_dir, *extra)
    ready = data_dir / "node.json"
    deadline = time.monotonic() + ready_timeout
    while True:
        info = _read_ready(ready)
        if info is not None and info.get("pid") == proc.pid:
            return NodeProcess(data_dir, proc, log_path, info)
        if proc.poll() is not None:
            raise AssertionError(f"node exited with {proc.returncode} before it was ready; "
                                 f"log:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"node not ready after {ready_timeout} s; log:\n"
                                 f"{log_path.read_text(errors='replace')}")
        time.sleep(0.05)


def _read_ready(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# -- libp2p client side ---------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def client_host(identity: Identity | None = None) -> AsyncIterator[IHost]:
    """A real libp2p host for the test side, closed on exit."""
    host = make_host(identity or Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            yield host
        finally:
            with trio.move_on_after(3) as scope, contextlib.suppress(Exception):
                scope.shield = True
                await host.close()


class ClientThread:
    """One libp2p host living in its own trio loop on a background thread, shared by tests.

    Dialling a node (TCP + Noise + yamux) and closing a host cost about half a second each, so
    a module's tests share one host: ``client.run(fn, *args)`` runs ``await fn(host, *args)`` in
    that loop and returns its result (or raises its exception) in the calling thread.
    """

    def __init__(self, identity: Identity | None = None,
                 services: Callable[[IHost], AbstractAsyncContextManager[Any]] | None = None,
                 ) -> None:
        self.identity = identity or Identity.generate()
        self.services = services  # entered with the host; its value is ``self.extra``
        self.extra: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="libp2p-client",
                                        daemon=True)
        self.host: IHost | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with client_host(self.identity) as host, AsyncExitStack() as stack:
            self.host = host
            if self.services is not None:
                self.extra = await stack.enter_async_context(self.services(host))
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def start(self) -> ClientThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None or self.host is None:
            raise AssertionError(f"the test's libp2p host did not start: {self._error!r}")
        return self

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, self.host, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


async def exchange(host: IHost, addr: str, protocol: TProtocol, payload: bytes, *,
                   close_write: bool = False, timeout: float = 15.0) -> dict[str, Any] | None:
    """Open a stream to ``addr``, write raw ``payload``, optionally half-close, read one frame."""
    info = peer_info(addr)
    await connect(host, info, 10)
    with trio.fail_after(timeout):
        stream = await host.new_stream(info.peer_id, [protocol])
        try:
            if payload:
                await stream.write(payload)
            if close_write:
                await stream.close()
            return await read_frame(stream)
        finally:
            await close_quietly(stream)


# -- /metrics -------------------------------------------------------------------------------------

def metric_value(text: str, sample: str, **labels: str) -> float:
    """The value of one Prometheus sample (0.0 when absent, as for a counter never touched)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def stop_at_teardown(request: Any, node: NodeProcess) -> NodeProcess:
    """``node``, stopped (SIGTERM, then SIGKILL) when ``request``'s scope ends."""
    request.addfinalizer(node.stop)
    return node


def serving_node(request: Any, data_dir: Path, deployment: Path, *extra: str) -> NodeProcess:
    """A node process holding every node shard of ``deployment``, stopped at teardown."""
    from node.store import ShardStore

    ShardStore(data_dir).add_deployment(deployment)
    return stop_at_teardown(request, start_node(data_dir, *extra))


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def veilnet_in_process(capsys: Any, *args: str) -> CommandResult:
    """Run the ``veilnet`` console command in this process (what the entry point calls), with
    pytest's ``capsys`` capturing its output."""
    capsys.readouterr()
    code = veilnet_main(list(args))
    out, err = capsys.readouterr()
    return CommandResult(code, out, err)
