"""Prometheus metrics of one node (its own registry, so several nodes can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("veilnet_requests", "Requests received, by protocol",
                                ["protocol"], registry=self.registry)
        self.errors = Counter("veilnet_errors", "Error responses sent, by protocol and code",
                              ["protocol", "code"], registry=self.registry)
        self.busy = Counter("veilnet_busy", "Requests refused busy, by the limit reached "
                            "(node/fair.py BUSY_REASONS)", ["reason"], registry=self.registry)
        self.latency = Histogram("veilnet_infer_latency_seconds",
                                 "Time from a complete infer request to its response",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.run_time = Histogram("veilnet_shard_run_seconds",
                                  "onnxruntime time of one shard run (excluding the network)",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.shards_served = Gauge("veilnet_shards_served", "Node shards in the store",
                                   registry=self.registry)
        self.shards_loaded = Gauge("veilnet_shards_loaded",
                                   "Shards with an onnxruntime session in memory",
                                   registry=self.registry)
        self.peers = Gauge("veilnet_peers_known", "Peers in the peer table",
                           registry=self.registry)
        self.corrupt_shards = Counter("veilnet_corrupt_shards", "Shard files found not to match "
                                      "their CID when loaded (then no longer served)",
                                      registry=self.registry)

        self.sessions_open = Gauge("veilnet_sessions_open", "Sessions (/veilnet/session/1) "
                                   "holding a KV cache on this node", registry=self.registry)
        self.session_cache_bytes = Gauge("veilnet_session_cache_bytes", "Bytes of KV cache the "
                                         "open sessions hold", registry=self.registry)
        self.session_steps = Counter("veilnet_session_steps", "Session calls that ran the "
                                     "shard, by op (open: the prefill, step)", ["op"],
                                     registry=self.registry)
        self.sessions_ended = Counter("veilnet_sessions_ended", "Sessions ended, by reason "
                                      "(closed, expired, failed: the prefill did not complete)",
                                      ["reason"], registry=self.registry)

        self.cards_received = Counter("veilnet_cards_received",
                                      "Agent cards received and indexed, by outcome "
                                      "(new, updated, stale)", ["outcome"],
                                      registry=self.registry)
        self.cards_dropped = Counter("veilnet_cards_dropped",
                                     "Agent cards rejected, by reason and source "
                                     "(pubsub, http, lookup)", ["reason", "source"],
                                     registry=self.registry)
        self.cards_indexed = Gauge("veilnet_cards_indexed", "Unexpired cards in the index",
                                   registry=self.registry)
        self.cards_published = Counter("veilnet_cards_published",
                                       "Times this node published its own card",
                                       registry=self.registry)
        self.cards_pulled = Counter("veilnet_cards_pulled",
                                    "Card lookups sent to a connected peer whose gossip had "
                                    "gone silent (node/discovery.py)", registry=self.registry)

        self.ledger_entries = Counter("veilnet_ledger_entries", "Entries this node's log "
                                      "committed", registry=self.registry)
        self.ledger_size = Gauge("veilnet_ledger_size", "Entries in this node's log",
                                 registry=self.registry)
        self.ledger_cosignatures = Gauge("veilnet_ledger_cosignatures",
                                         "Witnesses that cosigned the latest checkpoint",
                                         registry=self.registry)
        self.witness_cosigned = Counter("veilnet_witness_cosigned",
                                        "Checkpoints this node's witness cosigned",
                                        registry=self.registry)
        self.witness_refused = Counter("veilnet_witness_refused",
                                       "Checkpoints this node's witness refused, by reason "
                                       "(fork, inconsistent, conflict, unknown-log, bad-note)",
                                       ["reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
