"""Process and measurement machinery for bench/attacks.py: spawning and stopping children (they
get SIGTERM if the bench dies), the ``veilnet node start`` wrapper, /proc readers (CPU seconds,
VmRSS/VmHWM, system busy time), the /healthz poller that runs as a separate process (this file,
started with ``--poller``) and the hostile libp2p peer that serves /veilnet/shard/1."""

from __future__ import annotations

import ctypes
import json
import os
import queue
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import trio
from libp2p.abc import IHost, INetStream

from protocols import SHARD
from protocols.transport import close_quietly
from protocols.wire import read_frame, write_frame

REPO = Path(__file__).resolve().parent.parent
DECLARED = 1 << 40                      # the shard size the hostile peer declares
CHUNK = 1 << 20
HOSTILE_CHUNKS = 256                    # the hostile peer stops after 256 MiB whatever happens
ATTACK_TIMEOUT = 60.0                   # any single attack (and the hostile stream) ends by then
NODE_READY_S = 60.0
STOP_GRACE_S = 10.0
POLL_INTERVAL_S = 0.02
POLL_TIMEOUT_S = 30.0                   # one /healthz probe
POLL_MAX_S = 120.0                      # one polling window
POLL_MAX_PROBES = 20_000
PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes --------------------------------------------------------------------------------

try:  # resolved before any fork: the child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child, between fork and exec: SIGTERM when the bench dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(cmd: list[str], out: IO[bytes] | int, **kwargs: Any) -> subprocess.Popen[bytes]:
    """A child in its own session (a terminal's Ctrl-C reaches only the bench) that gets SIGTERM
    if the bench dies."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=out, start_new_session=True,
                            preexec_fn=_die_with_parent,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_GRACE_S. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(STOP_GRACE_S)
    return proc.returncode


class Node:
    """One ``veilnet node start`` process and the facts of its D/node.json."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        with open(self.log_path, "ab") as out:
            self.proc = spawn([sys.executable, "-m", "node", "node", "start", "--data-dir",
                               str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0", "--http",
                               "127.0.0.1:0"], out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = NODE_READY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = json.loads((self.data_dir / "node.json").read_text())
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict) and info.get("pid") == self.pid:
                self.info = info
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the node did not become ready (exit code {self.proc.poll()}); "
                           f"log:\n{self.log_tail()}")

    @property
    def http(self) -> str:
        return str(self.info["http"])

    @property
    def addr(self) -> str:
        return str(self.info["multiaddrs"][0])

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mib(pid: int, key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def system_busy_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat, minus idle, iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


# -- the /healthz poller (a separate process, so the bench's own work cannot delay it) --------

def poller_main() -> int:
    """Commands on stdin: ``start URL`` (answers ``started``, then probes URL/healthz every
    POLL_INTERVAL_S) and ``stop`` (finishes the probe in flight, answers one JSON line)."""
    commands: queue.Queue[str | None] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put(None)

    threading.Thread(target=read_stdin, daemon=True).start()
    with httpx.Client(timeout=POLL_TIMEOUT_S) as http:
        while True:
            command = commands.get()
            if command is None:
                return 0
            if not command.startswith("start "):
                continue  # a stop after a window that ended on its own bound
            url = command.split(" ", 1)[1] + "/healthz"
            print("started", flush=True)
            latencies: list[float] = []
            failures, eof = 0, False
            deadline = time.monotonic() + POLL_MAX_S
            while len(latencies) < POLL_MAX_PROBES and time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    ok = http.get(url).json().get("status") == "ok"
                except (httpx.HTTPError, ValueError):
                    ok = False
                latencies.append(time.perf_counter() - started)
                failures += not ok
                try:
                    command = commands.get(timeout=POLL_INTERVAL_S)
                except queue.Empty:
                    continue
                eof = command is None
                if eof or command == "stop":
                    break
            ms = sorted(x * 1e3 for x in latencies)
            print(json.dumps({"probes": len(ms), "failures": failures,
                              "median_ms": round(statistics.median(ms), 2),
                              "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
                              "max_ms": round(ms[-1], 2)}), flush=True)
            if eof:
                return 0


class Poller:
    def __init__(self, log_file: IO[bytes]) -> None:
        self.proc = spawn([sys.executable, str(Path(__file__).resolve()), "--poller"],
                          subprocess.PIPE, stdin=subprocess.PIPE, stderr=log_file)
        self._buf = b""

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"the /healthz poller did not answer within {timeout} s")
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"the /healthz poller exited ({self.proc.poll()})")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def start(self, http: str) -> None:
        self._send(f"start {http}")
        if self._line(60) != "started":  # the first call waits for the poller's imports
            raise RuntimeError("the /healthz poller did not start")

    def stop(self) -> dict[str, Any]:
        self._send("stop")
        return dict(json.loads(self._line(POLL_TIMEOUT_S + 5)))

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # EOF: the poller exits
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop(self.proc)


# -- the hostile libp2p peer: serves /veilnet/shard/1 as a malicious node would -----------------

class HostileShards:
    """Serves the manifest of a deployment honestly, then declares its shard as DECLARED bytes
    and sends 1 MiB chunks until the node hangs up (at most HOSTILE_CHUNKS)."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.chunks_sent = 0

    @asynccontextmanager
    async def serve(self, host: IHost) -> AsyncIterator[HostileShards]:
        host.set_stream_handler(SHARD, self._handle)
        yield self

    async def _handle(self, stream: INetStream) -> None:
        try:
            with trio.move_on_after(ATTACK_TIMEOUT):
                req = await read_frame(stream)
                if req is None:
                    return
                cid = str(req.get("cid"))
                self.requests.append(cid)
                head = {"v": 1, "id": req.get("id"), "cid": cid}
                if cid in self.manifests:
                    data = self.manifests[cid]
                    await write_frame(stream, {**head, "size": len(data)})
                    await write_frame(stream, {"data": data})
                    return
                await write_frame(stream, {**head, "size": DECLARED})
                block = bytes(CHUNK)
                for _ in range(HOSTILE_CHUNKS):
                    await write_frame(stream, {"data": block})
                    self.chunks_sent += 1
        except Exception:
            pass  # the node hung up: that is the point
        finally:
            await close_quietly(stream)


if __name__ == "__main__":  # the poller process that Poller starts
    if sys.argv[1:] != ["--poller"]:
        sys.exit("usage: attack_harness.py --poller (started by bench/attacks.py)")
    sys.exit(poller_main())
