"""Links that are not loopback, for local testnets: every host (node i, the client) in its own
Linux network namespace, joined by a userspace link emulator with ``tc netem`` semantics.

This kernel-independent emulator exists because ``sch_netem`` is often not built
(CONFIG_NET_SCH_NETEM unset: ``tc qdisc add ... netem`` answers "Specified qdisc kind is
unknown"), and no maintained Python library does userspace netem. The emulator process
(scripts/netem_link.py, root namespace) gives each host a TUN device moved into a namespace
``veilnet-<tag>-<host>`` with the address 10.77.<k>.<i+1>/24, plus a TUN leg of its own in the
root namespace (10.77.<k>.254, no delay: the harness reads the nodes' HTTP APIs through it). It
forwards every IPv4 packet to the TUN of its destination after the *sender's* netem: with
``delay 20ms`` on every host, the one-way delay between two hosts is 20 ms and a round trip 40 ms,
as with netem on each host's egress. ``tag`` is derived from the testnet directory, so parallel
testnets do not collide and ``clean(tag)`` removes exactly one testnet's leftovers.

    with Links(root, ["n0", "n1", "client"], "delay 20ms loss 1%", seed=1) as links:
        links.address("n0")        # 10.77.<k>.1
        links.wrap("n0", cmd)      # ["ip", "netns", "exec", "veilnet-<tag>-n0", *cmd]
        links.stats()              # packets/bytes forwarded and dropped, per link and per pair
        links.set_netem("loss 5%") # new parameters for every host, applied at once (also
                                   # retune(root, "loss 5%") from another process)

Supported netem words: ``delay TIME [JITTER]`` (jitter uniform +-, packets reorder as with
netem), ``loss [random] PERCENT``, ``duplicate PERCENT``, ``rate RATE``, ``limit PACKETS``
(netem's queue limit, default 1000). Any other word is an error naming it. Times as tc takes
them (``40ms``, ``1.5s``, ``200us``; a bare number is microseconds), percentages with or without
``%``, rates in tc units (``10mbit``, ``1gbit``, ``500kbps`` = bytes/s).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PREFIX = "veilnet-"  # every namespace this module creates is named veilnet-<tag>-<host>
STATE_FILE = "netem.json"  # T/netem.json while the links are up: tag, pid, hosts
STATS_FILE = "netem-stats.json"  # T/netem-stats.json: the emulator's counters (kept after stop)
SPEC_FILE = "netem-spec.json"  # new parameters for a running emulator (retune)
DEFAULT_MTU = 65000  # large: fewer packets for Python to forward (TCP segments up to ~64 KB)
START_TIMEOUT = 20.0
STOP_GRACE = 5.0
LINK_SCRIPT = Path(__file__).resolve().parent / "netem_link.py"


class NetemError(ValueError):
    """Bad netem arguments, a missing tool, or links that could not be set up."""


# -- netem arguments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Netem:
    """One link's parameters (the sender's egress, as netem on that host's interface)."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0  # probability, 0..1
    duplicate: float = 0.0  # probability, 0..1
    rate_bps: float | None = None  # bits per second; None: unlimited
    limit: int = 1000  # packets queued per link (netem's default)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


SUPPORTED = ("delay", "loss", "duplicate", "rate", "limit")
# units per second (a divisor, so 400us is exactly 0.0004 s); tc: a bare number is usecs
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "ms": 1e3, "msec": 1e3, "msecs": 1e3,
               "us": 1e6, "usec": 1e6, "usecs": 1e6, "": 1e6}
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "kibit": 1024.0, "mibit": 1024.0**2, "gibit": 1024.0**3, "bps": 8.0,
               "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "kibps": 8 * 1024.0,
               "mibps": 8 * 1024.0**2, "": 8.0}  # tc: a bare number is bytes per second
_NUMBER = re.compile(r"^([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)([a-z%]*)$")


def _number(word: str, what: str, units: dict[str, float]) -> float:
    m = _NUMBER.match(word.lower())
    if m is None or m.group(2) not in units:
        raise NetemError(f"netem: {word!r} is not a {what} (e.g. 10mbit)")
    return float(m.group(1)) * units[m.group(2)]


def _time(word: str) -> float:
    m = _NUMBER.match(word.lower())
    if m is None or m.group(2) not in _TIME_UNITS:
        raise NetemError(f"netem: {word!r} is not a time (e.g. 20ms)")
    return float(m.group(1)) / _TIME_UNITS[m.group(2)]


def _percent(word: str, what: str) -> float:
    m = _NUMBER.match(word)
    if m is None or m.group(2) not in ("", "%"):
        raise NetemError(f"netem: {what} {word!r} is not a percentage (e.g. 1% or 0.5)")
    value = float(m.group(1))
    if value > 100:
        raise NetemError(f"netem: {what} {word!r} is more than 100%")
    return value / 100.0


def _is_value(word: str | None) -> bool:
    return bool(word) and (word[0].isdigit() or word[0] == ".")  # type: ignore[index]


def parse_netem(text: str | Sequence[str]) -> Netem:
    """The parameters of a ``tc qdisc ... netem`` argument string, e.g. ``delay 40ms 10ms loss
    1%``. Raises NetemError naming a word that is not supported or not understood."""
    words = text.split() if isinstance(text, str) else [str(w) for w in text]
    out: dict[str, Any] = {}
    seen: set[str] = set()
    i = 0

    def value(at: int, what: str) -> str:
        if at >= len(words) or not _is_value(words[at]):
            raise NetemError(f"netem: {words[i]!r} needs a {what} after it")
        return words[at]

    while i < len(words):
        word = words[i].lower()
        if word in seen:
            raise NetemError(f"netem: {word!r} is given twice")
        seen.add(word)
        if word == "delay":
            out["delay_s"] = _time(value(i + 1, "time"))
            i += 2
            if i < len(words) and _is_value(words[i]):
                out["jitter_s"] = _time(words[i])
                i += 1
        elif word == "loss":
            model = words[i + 1].lower() if i + 1 < len(words) else ""
            if model in ("state", "gemodel"):
                raise NetemError(f"netem: loss model {model!r} is not supported (only "
                                 "'loss [random] PERCENT')")
            at = i + 2 if model == "random" else i + 1
            out["loss"] = _percent(value(at, "percentage"), "loss")
            i = at + 1
        elif word == "duplicate":
            out["duplicate"] = _percent(value(i + 1, "percentage"), "duplicate")
            i += 2
        elif word == "rate":
            out["rate_bps"] = _number(value(i + 1, "rate"), "rate", _RATE_UNITS)
            if out["rate_bps"] <= 0:
                raise NetemError(f"netem: rate {words[i + 1]!r} must be above 0")
            i += 2
        elif word == "limit":
            limit = value(i + 1, "number of packets")
            if not limit.isdigit() or int(limit) < 1:
                raise NetemError(f"netem: limit {limit!r} is not a number of packets")
            out["limit"] = int(limit)
            i += 2
        else:
            extra = " (correlation values are not supported)" if _is_value(word) else ""
            raise NetemError(f"netem: {words[i]!r} is not supported by veilnet's userspace link "
                             f"emulator{extra}; supported: {', '.join(SUPPORTED)}")
    return Netem(**out)


# -- namespaces -----------------------------------------------------------------------------------


def tag_for(root: Path | str) -> str:
    """The tag of the testnet in directory ``root`` (6 hex digits of its absolute path)."""
    return hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:6]


def require_tools() -> None:
    """Root, iproute2's ``ip`` and /dev/net/tun, or a NetemError saying what is missing."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and TUN devices need it; run as root)")
    if shutil.which("ip") is None:
        missing.append("the 'ip' command (install iproute2: apt-get install iproute2)")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        missing.append("/dev/net/tun (the tun kernel module)")
    if missing:
        raise NetemError("--netem needs " + "; ".join(missing))


def namespaces(prefix: str = PREFIX) -> list[str]:
    """Network namespaces whose names start with ``prefix``."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.strip() and line.split()[0].startswith(prefix)]


def remove_namespace(ns: str, grace: float = 3.0) -> None:
    """Stop every process in ``ns`` (SIGTERM, SIGKILL after ``grace`` s) and delete it."""
    def pids() -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = pids()
        if not left:
            break
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def clean(root: Path | str | None, everything: bool = False) -> list[str]:
    """Remove what a crashed testnet left: its namespaces (processes in them stopped first), a
    stray emulator and T/netem.json. ``everything``: every veilnet-* namespace. Returns what was
    removed."""
    removed = []
    if root is not None:
        state = _read_json(Path(root) / STATE_FILE)
        pid = state.get("pid") if isinstance(state, dict) else None
        if isinstance(pid, int) and LINK_SCRIPT.name in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # it removes its namespaces itself
            removed.append(f"emulator pid {pid}")
            _wait_gone(pid, STOP_GRACE)
        (Path(root) / STATE_FILE).unlink(missing_ok=True)
    prefix = PREFIX if everything or root is None else f"{PREFIX}{tag_for(root)}-"
    for ns in namespaces(prefix):
        remove_namespace(ns)
        removed.append(f"namespace {ns}")
    return removed


# -- the links, from the parent's side -------------------------------------------------------------


class Links:
    """The emulator process and its namespaces for ``hosts``; see the module docstring."""

    def __init__(self, root: Path | str, hosts: Sequence[str], netem: str | Netem = "",
                 *, seed: int = 0, mtu: int = DEFAULT_MTU,
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.root = Path(root).absolute()
        self.hosts = list(hosts)
        self.netem = netem if isinstance(netem, Netem) else parse_netem(netem)
        self.seed, self.mtu, self.log = seed, mtu, log
        self.tag = tag_for(self.root)
        self.info: dict[str, Any] = {}
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Links:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def stats_file(self) -> Path:
        return self.root / STATS_FILE

    def start(self) -> Links:
        require_tools()
        self.root.mkdir(parents=True, exist_ok=True)
        state = _read_json(self.state_file)
        pid = state.get("pid") if isinstance(state, dict) else None
        if isinstance(pid, int) and LINK_SCRIPT.name in _cmdline(pid):
            raise NetemError(f"the links of another testnet in {self.root} are up (emulator pid "
                             f"{pid}); stop it or use another --dir")
        for what in clean(self.root):  # a previous run of this directory that was killed
            self.log(f"removed leftover {what}")
        self.stats_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(LINK_SCRIPT), "--tag", self.tag, "--hosts", ",".join(self.hosts),
               "--netem", json.dumps(self.netem.to_json()), "--seed", str(self.seed),
               "--mtu", str(self.mtu), "--stats", str(self.stats_file)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()))
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
            line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if not line:
                self.proc.kill()
                _, err = self.proc.communicate(timeout=STOP_GRACE)
                raise NetemError(f"the link emulator did not start: {err.strip()[-2000:]}")
            self.info = json.loads(line)
            self.state_file.write_text(json.dumps(
                {"tag": self.tag, "pid": self.proc.pid, "netem": self.netem.to_json(),
                 "seed": self.seed, "mtu": self.mtu, **self.info}, indent=2) + "\n")
        except BaseException:
            self.stop()
            raise
        return self

    def address(self, host: str) -> str:
        return str(self.info["hosts"][host]["address"])

    def namespace(self, host: str) -> str:
        return str(self.info["hosts"][host]["namespace"])

    def wrap(self, host: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside ``host``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(host), *cmd]

    def set_netem(self, netem: str | Netem) -> dict[str, Any]:
        """New parameters for every host's link (packets already queued keep theirs)."""
        self.netem = netem if isinstance(netem, Netem) else parse_netem(netem)
        return retune(self.root, self.netem)

    def stats(self) -> dict[str, Any]:
        """The emulator's counters now: per sender link and per (sender, receiver) pair,
        packets and bytes forwarded, dropped (loss, queue limit), duplicated."""
        return _ask(self.root, signal.SIGUSR1)

    def stop(self) -> dict[str, Any]:
        """Stop the emulator: it stops what still runs in its namespaces and deletes them.
        Returns its final counters (also left in T/netem-stats.json)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        for ns in namespaces(f"{PREFIX}{self.tag}-"):  # if the emulator could not
            remove_namespace(ns)
        self.state_file.unlink(missing_ok=True)
        (self.root / SPEC_FILE).unlink(missing_ok=True)
        return _read_json(self.stats_file) or {}


def retune(root: Path | str, netem: str | Netem) -> dict[str, Any]:
    """Give the links of the running testnet in ``root`` new parameters (``testnet.py netem``);
    returns the counters up to the change."""
    spec = netem if isinstance(netem, Netem) else parse_netem(netem)
    (Path(root) / SPEC_FILE).write_text(json.dumps(spec.to_json()))
    return _ask(root, signal.SIGHUP)


def _ask(root: Path | str, sig: int, timeout: float = 5.0) -> dict[str, Any]:
    """Send ``sig`` to the emulator of ``root`` and return the counters it writes then."""
    state = _read_json(Path(root) / STATE_FILE)
    pid = state.get("pid") if isinstance(state, dict) else None
    if not isinstance(pid, int) or LINK_SCRIPT.name not in _cmdline(pid):
        raise NetemError(f"no link emulator runs for {root} (no testnet up with --netem there)")
    stats_file = Path(root) / STATS_FILE
    before = int((_read_json(stats_file) or {}).get("dumps", 0))
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = _read_json(stats_file) or {}
        if int(stats.get("dumps", 0)) > before:
            return stats
        time.sleep(0.01)
    raise NetemError(f"the link emulator wrote no counters within {timeout:g} s")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _cmdline(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _cmdline(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:  # in the child: SIGTERM when the parent dies (then it cleans up)
        if _prctl is not None:
            _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return setup


__all__ = ["Links", "Netem", "NetemError", "clean", "namespaces", "parse_netem", "retune",
           "tag_for"]
