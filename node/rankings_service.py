"""Node rankings: aggregated from clients' signed score reports in the ledger, served by every
node at ``GET /v1/rankings``.

A ledger node reads the ``score-report/1`` entries of its log (the newest report of each
reporter counts), aggregates them robustly (``consensus.rankings.aggregate``: each reporter's
score is clipped to the reporter-weighted median, so a minority of lying reporters can neither
lift nor sink a node) and, when the ranking changed, appends a ``ranking/1`` snapshot signed by
the node. Nodes without a ledger fetch the newest snapshot from a ledger node
(``/veilnet/ledger/1`` op ``rankings``) and serve it after checking its signature against the
ledger node's card.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost

from consensus.rankings import Report, aggregate
from crypto.identity import Identity
from ledger.entries import EntryError, make_entry, parse_entry
from node.discovery import Discovery
from node.ledger_service import LedgerService
from protocols.ledger import fetch_ranking
from protocols.transport import PEER_ERRORS

log = logging.getLogger("veilnet.rankings")
FIGURES = ("agreement", "latency_ms", "availability")


class RankingService:
    def __init__(self, identity: Identity, ledger: LedgerService, discovery: Discovery,
                 interval: float) -> None:
        self.identity = identity
        self.ledger = ledger
        self.discovery = discovery
        self.interval = interval
        self.host: IHost | None = None
        self.snapshot: dict[str, Any] | None = None  # {"rows", "reporters", "source", "time"}
        self.entry: bytes | None = None               # the signed ranking/1 entry behind it
        self._reports: dict[str, tuple[int, dict[str, Any]]] = {}  # reporter -> (time, scores)
        self._next = 0  # next log index to read
        self._wake = trio.Event()
        ledger.on_commit = self._poke  # a new batch may hold new score reports

    def rows(self) -> list[dict[str, Any]]:
        return list(self.snapshot["rows"]) if self.snapshot else []

    def _poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self.ledger.ledger is None:  # fetch from ledger nodes, every interval
                await trio.sleep(self.interval)
                step = self.fetch
            else:
                step = self.update_from_log
            try:
                await step()
            except Exception:  # rankings must never stop the node
                log.exception("rankings update failed")
            if self.ledger.ledger is not None:  # until the next commit or interval
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()

    # -- ledger node --------------------------------------------------------------------------

    async def update_from_log(self) -> bool:
        """Read new score reports; append a ranking snapshot when the ranking changed."""
        log_ = self.ledger.ledger
        assert log_ is not None
        rows = await self.ledger.on_log(log_.store.entries, self._next, log_.size)
        for index, data in rows:
            self._next = index + 1
            try:
                entry = parse_entry(data)
            except EntryError:
                continue
            if entry.type != "score-report/1" or not isinstance(entry.body.get("scores"), dict):
                continue
            known = self._reports.get(entry.author)
            if known is None or known[0] <= entry.time:
                self._reports[entry.author] = (entry.time, entry.body["scores"])
        ranked = rank(self._reports)
        if not ranked or (self.snapshot is not None and ranked == self.snapshot["rows"]):
            return False  # no reports yet, or nothing changed
        entry = make_entry(self.identity, "ranking/1",
                           {"rows": ranked, "reporters": len(self._reports)})
        await self.ledger.submit(entry)
        self.entry = entry
        self.snapshot = {"rows": ranked, "reporters": len(self._reports),
                         "source": self.identity.did, "time": parse_entry(entry).time}
        return True

    # -- other nodes --------------------------------------------------------------------------

    async def fetch(self) -> bool:
        """The newest snapshot of any ledger node in the card index."""
        if self.host is None:
            return False
        best: tuple[int, bytes, dict[str, Any]] | None = None
        for info in self.discovery.index.infos():
            if not info.ledger_key or info.peer_id == self.identity.peer_id:
                continue
            try:
                with trio.fail_after(10):
                    data, entry = await fetch_ranking(self.host, info.peer_id, info.multiaddrs,
                                                      info.did, 5)
            except PEER_ERRORS as exc:  # none yet, unreachable, or not signed by that node
                log.debug("rankings from %s: %s", info.peer_id, exc)
                continue
            if best is None or entry.time > best[0]:
                best = (entry.time, data, entry.body)
        if best is None:
            return False
        self.entry = best[1]
        author = parse_entry(best[1]).author
        self.snapshot = {"rows": best[2].get("rows", []), "reporters": best[2].get("reporters"),
                         "source": author, "time": best[0]}
        return True


def rank(reports: dict[str, tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Ranking rows, best first: ``{"did", "score", "median", "reporters", "weight",
    "agreement", "latency_ms", "availability"}`` (the figures are means over reporters)."""
    parsed: list[Report] = []
    figures: dict[str, dict[str, list[float]]] = {}
    for reporter, (_, scores) in sorted(reports.items()):
        clean: dict[str, float] = {}
        for did, row in scores.items():
            if not isinstance(did, str) or not isinstance(row, dict):
                continue
            score = row.get("score")
            if not isinstance(score, int | float) or not 0.0 <= float(score) <= 1.0:
                continue
            clean[did] = float(score)
            for key in FIGURES:
                value = row.get(key)
                if isinstance(value, int | float):
                    figures.setdefault(did, {}).setdefault(key, []).append(float(value))
        if clean:
            parsed.append(Report(reporter, 1.0, clean))
    rows = []
    for row in aggregate(parsed):
        did = row["node"]
        out = {"did": did, **{k: v for k, v in row.items() if k != "node"}}
        for key in FIGURES:
            values = figures.get(did, {}).get(key)
            out[key] = round(sum(values) / len(values), 4) if values else None
        rows.append(out)
    return rows
