"""The link emulator process of scripts/netem.py (run by ``netem.Links``; needs root).

It creates, for each host, a network namespace ``veilnet-<tag>-<host>`` and a TUN device moved
into it (address 10.77.<k>.<i+1>/24, the /24 routed through the TUN, lo up, a large MTU), plus a
TUN leg in the root namespace (10.77.<k>.254) for the harness. Then it forwards IPv4 packets
between the TUN devices: a packet read from host A's TUN is delivered to the TUN of its
destination after A's netem (delay +- uniform jitter, loss, duplicate, rate, queue limit), from a
heap of (release time, seq, ...) polled with epoll. Traffic to or from the root leg is control
traffic: forwarded at once, counted apart. The TUN devices are opened by hand (fcntl.ioctl
TUNSETIFF, a few lines) because no maintained Python library does userspace netem.

Prints one JSON line when ready: {"subnet", "root_address", "hosts": {name: {"namespace",
"address", "device"}}}. SIGUSR1: write the counters to --stats; SIGHUP: read new parameters
from netem-spec.json beside --stats; SIGTERM/SIGINT (also the parent's death, by
PR_SET_PDEATHSIG): stop the processes left in its namespaces, delete them, write the counters.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netem import PREFIX, SPEC_FILE, Netem, remove_namespace

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SUBNET_LOCK = "/run/lock/veilnet-netem.lock"  # two emulators never pick the same /24
ROOT_HOST = 254
CONTROL = "root"
BURST = 64  # packets read from one TUN per round (fairness between hosts)


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def pick_subnet() -> int:
    """A k with 10.77.k.0/24 in no address or route of the root namespace."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for k in range(1, 255):
        if f"10.77.{k}." not in used:
            return k
    raise RuntimeError("no free 10.77.<k>.0/24 subnet")


class Emulator:
    def __init__(self, tag: str, hosts: list[str], netem: Netem, seed: int, mtu: int,
                 stats: Path) -> None:
        self.tag, self.hosts, self.netem, self.mtu = tag, hosts, netem, mtu
        self.rng = random.Random(seed)
        self.stats_path = stats
        self.fds: dict[str, int] = {}  # host (and CONTROL) -> TUN fd
        self.by_fd: dict[int, str] = {}
        self.route: dict[bytes, int] = {}  # destination IPv4 address -> TUN fd
        self.namespaces: list[str] = []
        self.heap: list[tuple[float, int, int, bytes, str]] = []
        self.seq = 0
        self.busy_until: dict[str, float] = {}  # rate: when each link is free again
        self.queued: dict[str, int] = {}  # packets of each link in the heap
        self.counts: dict[str, dict[str, int]] = {}
        self.dumps = 0
        self.flags: set[str] = set()

    # -- set-up and tear-down ------------------------------------------------------------------

    def setup(self) -> dict[str, Any]:
        Path(SUBNET_LOCK).parent.mkdir(parents=True, exist_ok=True)
        with open(SUBNET_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            k = pick_subnet()
            root_dev = f"vn{self.tag}r"
            self._add_fd(CONTROL, open_tun(root_dev), f"10.77.{k}.{ROOT_HOST}")
            run(["ip", "addr", "add", f"10.77.{k}.{ROOT_HOST}/24", "dev", root_dev])
            run(["ip", "link", "set", root_dev, "mtu", str(self.mtu), "up"])
        out: dict[str, Any] = {"subnet": f"10.77.{k}.0/24",
                               "root_address": f"10.77.{k}.{ROOT_HOST}", "hosts": {}}
        for i, host in enumerate(self.hosts):
            ns, dev, addr = f"{PREFIX}{self.tag}-{host}", f"vn{self.tag}{host}"[:15], \
                f"10.77.{k}.{i + 1}"
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            self._add_fd(host, open_tun(dev), addr)
            run(["ip", "link", "set", dev, "netns", ns])
            for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{addr}/24", "dev", dev],
                        ["link", "set", dev, "mtu", str(self.mtu), "txqueuelen", "10000", "up"]):
                run(["ip", "-n", ns, *cmd])
            out["hosts"][host] = {"namespace": ns, "address": addr, "device": dev}
        return out

    def _add_fd(self, host: str, fd: int, addr: str) -> None:
        self.fds[host], self.by_fd[fd] = fd, host
        self.route[bytes(int(x) for x in addr.split("."))] = fd

    def teardown(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for ns in self.namespaces:
            remove_namespace(ns)

    # -- forwarding ----------------------------------------------------------------------------

    def count(self, key: str, what: str, n: int = 1) -> None:
        self.counts.setdefault(key, {}).setdefault(what, 0)
        self.counts[key][what] += n

    def receive(self, src: str, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # IPv6 router solicitations and the like: this network is IPv4 only
        dst_fd = self.route.get(packet[16:20])
        if dst_fd is None:
            self.count(src, "unroutable")
            return
        dst = self.by_fd[dst_fd]
        if CONTROL in (src, dst):  # the harness's own traffic: no emulation
            self._write(dst_fd, packet)
            self.count("control", "packets")
            self.count("control", "bytes", len(packet))
            return
        pair, link = f"{src}->{dst}", self.netem
        self.count(src, "sent")
        if link.loss and self.rng.random() < link.loss:
            self.count(src, "lost")
            self.count(pair, "lost")
            return
        copies = 2 if link.duplicate and self.rng.random() < link.duplicate else 1
        if copies == 2:
            self.count(src, "duplicated")
        for _ in range(copies):
            if self.queued.get(src, 0) >= link.limit:
                self.count(src, "overflow")
                continue
            start = now
            if link.rate_bps:
                start = max(now, self.busy_until.get(src, 0.0)) + len(packet) * 8 / link.rate_bps
                self.busy_until[src] = start
            jitter = self.rng.uniform(-link.jitter_s, link.jitter_s) if link.jitter_s else 0.0
            release = start + max(0.0, link.delay_s + jitter)
            self.seq += 1
            self.queued[src] = self.queued.get(src, 0) + 1
            heapq.heappush(self.heap, (release, self.seq, dst_fd, packet, src))
            self.count(pair, "packets")
            self.count(pair, "bytes", len(packet))

    def _write(self, fd: int, packet: bytes) -> None:
        try:
            os.write(fd, packet)
        except OSError:
            self.count(self.by_fd[fd], "write_errors")

    def loop(self) -> None:
        poller = select.epoll()
        for fd in self.fds.values():
            poller.register(fd, select.EPOLLIN)
        while "stop" not in self.flags:
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                _, _, fd, packet, src = heapq.heappop(self.heap)
                self.queued[src] -= 1
                self._write(fd, packet)
            wait = min(0.2, self.heap[0][0] - now) if self.heap else 0.2
            for fd, _ in poller.poll(max(wait, 0.0)):
                src = self.by_fd[fd]
                for _ in range(BURST):
                    try:
                        packet = os.read(fd, 65536)
                    except (BlockingIOError, OSError):
                        break
                    self.receive(src, packet, time.monotonic())
            if "reload" in self.flags:
                self.flags.discard("reload")
                spec = json.loads((self.stats_path.parent / SPEC_FILE).read_text())
                self.netem = Netem(**spec)
                self.dump()
            if "dump" in self.flags:
                self.flags.discard("dump")
                self.dump()

    def dump(self) -> None:
        self.dumps += 1
        links = {h: self.counts.get(h, {}) for h in self.hosts}
        pairs = {k: v for k, v in self.counts.items() if "->" in k}
        doc = {"dumps": self.dumps, "netem": self.netem.to_json(), "links": links,
               "pairs": pairs, "control": self.counts.get("control", {}),
               "forwarded": sum(v.get("packets", 0) for v in pairs.values()),
               "forwarded_bytes": sum(v.get("bytes", 0) for v in pairs.values()),
               "dropped": sum(v.get("lost", 0) + v.get("overflow", 0) for v in links.values())}
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.stats_path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--hosts", required=True, help="comma-separated host names")
    ap.add_argument("--netem", required=True, help="the Netem fields as JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mtu", type=int, default=65000)
    ap.add_argument("--stats", type=Path, required=True)
    args = ap.parse_args()
    emu = Emulator(args.tag, args.hosts.split(","), Netem(**json.loads(args.netem)), args.seed,
                   args.mtu, args.stats)
    for sig, flag in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"),
                      (signal.SIGUSR1, "dump"), (signal.SIGHUP, "reload")):
        signal.signal(sig, lambda s, f, flag=flag: emu.flags.add(flag))
    try:
        info = emu.setup()
        print(json.dumps(info), flush=True)
        emu.loop()
    except Exception as exc:
        print(f"netem_link: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        emu.teardown()
        emu.dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
