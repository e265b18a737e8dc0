"""Node settings: defaults, overridden by a TOML file, overridden by command-line flags.

A config file holds the same keys as the flags of ``veilnet node start``::

    data_dir = "node1"
    listen = ["/ip4/127.0.0.1/tcp/4001"]
    http = "127.0.0.1:8401"
    bootstrap = ["/ip4/127.0.0.1/tcp/4002/p2p/12D3KooW..."]
    capacity = 1           # shard runs at once
    threads = 0            # onnxruntime intra-op threads per run (0: onnxruntime's default)
    frame_limit = 67108864 # bytes
    shard_size_limit = 1073741824  # bytes: largest shard fetched when its manifest gives no size
    request_timeout = 60   # seconds to receive and answer one request
    idle_timeout = 30      # seconds an idle infer stream stays open for the next request
    announce_interval = 10 # seconds between hellos and card announcements (cards live 3x this)
    card_rate = 2          # cards/s this node aims to receive: with more than
                           # announce_interval * card_rate cards known, announcements slow down
    max_sessions = 16      # /veilnet/session/1 sessions (KV caches) held at once
    max_context = 2048     # tokens of KV cache per session, over its batch (and never more
                           # positions than the model's context_length)
    session_expiry = 300   # seconds a session may stay idle before it is dropped
    domain = "node1.example.org"  # optional: publish a did:wba DID for this domain too
    ledger = false         # keep a transparency log in D/ledger (every node is a witness)
    record_received = "audit/"  # AUDIT ONLY, off by default: write every tensor clients send
    record_max_mb = 1024   # stop recording when the directory would grow past this
    log_level = "info"
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from errors import InputError
from node.recorder import DEFAULT_MAX_MB
from node.sessions import (
    DEFAULT_IDLE_EXPIRY,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_SESSIONS,
    SessionLimits,
)
from protocols.http_address import split_host_port
from protocols.wire import DEFAULT_FRAME_LIMIT

DEFAULT_SHARD_SIZE_LIMIT = 1 << 30  # shards of manifests that declare no size (older ones)


class ConfigError(InputError):
    pass


@dataclass
class NodeConfig:
    data_dir: Path | None = None
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    http: str = "127.0.0.1:0"
    bootstrap: list[str] = field(default_factory=list)
    capacity: int = 1
    threads: int = 0
    frame_limit: int = DEFAULT_FRAME_LIMIT
    shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT
    request_timeout: float = 60.0
    idle_timeout: float = 30.0
    announce_interval: float = 10.0
    card_rate: float = 2.0
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_context: int = DEFAULT_MAX_CONTEXT
    session_expiry: float = DEFAULT_IDLE_EXPIRY
    domain: str | None = None
    ledger: bool = False
    byzantine_test_mode: str | None = None
    record_received: Path | None = None  # an audit flag: what clients send, written to disk
    record_max_mb: int = DEFAULT_MAX_MB
    log_level: str = "info"

    @property
    def card_ttl(self) -> float:
        """How long a published card stays valid at the base interval (registry.card.card_ttl;
        node/discovery.py lengthens the interval in a large network)."""
        from registry.card import card_ttl

        return card_ttl(self.announce_interval)

    def session_limits(self) -> SessionLimits:
        return SessionLimits(self.max_sessions, self.max_context, self.session_expiry)

    def http_host_port(self) -> tuple[str, int]:
        parsed = split_host_port(self.http)
        if parsed is None:
            raise ConfigError(f"http: {self.http!r} is not HOST:PORT")
        return parsed

    def check(self) -> None:
        if self.data_dir is None:
            raise ConfigError("no data directory: pass --data-dir or set data_dir in the config")
        if not self.listen:
            raise ConfigError("listen: at least one multiaddr is needed")
        self.http_host_port()
        for name in ("capacity", "frame_limit", "shard_size_limit", "max_sessions",
                     "max_context", "record_max_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.threads < 0:
            raise ConfigError("threads must be 0 (onnxruntime's default) or more")
        timeouts = (self.request_timeout, self.idle_timeout, self.announce_interval,
                    self.session_expiry)
        if not all(math.isfinite(t) and t > 0 for t in timeouts):  # TOML has nan and inf
            raise ConfigError("request_timeout, idle_timeout, announce_interval and "
                              "session_expiry must be positive (finite) numbers of seconds, "
                              f"got {', '.join(f'{t:g}' for t in timeouts)}")
        if not (math.isfinite(self.card_rate) and self.card_rate > 0):
            raise ConfigError(f"card_rate must be a positive number of cards per second, got "
                              f"{self.card_rate:g}")
        from registry.card import MAX_TTL_S

        if 3 * self.announce_interval > MAX_TTL_S:  # peers would reject the node's own cards
            raise ConfigError(f"announce_interval {self.announce_interval:g}: at most "
                              f"{MAX_TTL_S / 3:g} s (cards live 3 intervals, at most "
                              f"{MAX_TTL_S} s)")
        if self.domain is not None:
            from registry.anp import check_domain

            try:
                self.domain = check_domain(self.domain)
            except ValueError as exc:
                raise ConfigError(f"domain: {exc}") from None
        if self.byzantine_test_mode is not None:
            from node.byzantine import MODES

            if self.byzantine_test_mode not in MODES:
                raise ConfigError(f"byzantine_test_mode {self.byzantine_test_mode!r}: use one "
                                  f"of {', '.join(MODES)}")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"log_level {self.log_level!r}: use debug, info, warning or error")


_TYPES: dict[str, Any] = {
    "data_dir": (str,), "listen": (list, str), "http": (str,), "bootstrap": (list, str),
    "capacity": (int,), "threads": (int,), "frame_limit": (int,), "shard_size_limit": (int,),
    "request_timeout": (int, float), "idle_timeout": (int, float),
    "announce_interval": (int, float), "card_rate": (int, float), "max_sessions": (int,),
    "max_context": (int,),
    "session_expiry": (int, float), "domain": (str,), "ledger": (bool,),
    "byzantine_test_mode": (str,), "record_received": (str,), "record_max_mb": (int,),
    "log_level": (str,),
}


def load_config(path: Path | None, overrides: dict[str, Any]) -> NodeConfig:
    """Defaults, then the TOML file at ``path`` (if any), then non-None ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: the config is not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        unknown = sorted(set(raw) - set(_TYPES))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(_TYPES)}")
        for key, value in raw.items():
            if not isinstance(value, _TYPES[key]) or (isinstance(value, bool)
                                                       and bool not in _TYPES[key]):
                raise ConfigError(f"{path}: {key} has the wrong type "
                                  f"({type(value).__name__})")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {key} must be a list of strings")
            values[key] = [value] if key in ("listen", "bootstrap") and isinstance(value,
                                                                                   str) else value
        for key in ("data_dir", "record_received"):  # relative to the config file
            if key in values:
                if "\x00" in values[key]:
                    raise ConfigError(f"{path}: {key} contains a NUL character")
                values[key] = (Path(path).parent / values[key]).resolve()
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    known = {f.name for f in fields(NodeConfig)}
    config = NodeConfig(**{k: v for k, v in values.items() if k in known})
    if config.data_dir is not None:
        config.data_dir = Path(config.data_dir)
    if config.record_received is not None:
        config.record_received = Path(config.record_received)
    config.check()
    return config
