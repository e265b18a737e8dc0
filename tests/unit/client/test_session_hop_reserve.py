"""SessionHop asks backed-off holders when the others cannot decide a step (issue 17: the
chaos soak with generations failed steps with "only one node answered" while a healthy holder,
backed off after an earlier restart, was up). The network edge is faked: a caller that answers
like a node (outputs are a function of every input the session has seen), or fails."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio

from client.replicated import VerifyPolicy
from client.results import QueryError
from client.router import Router
from client.session_hop import SessionHop
from consensus.fingerprint import fingerprint
from models.manifest import ShardSpec
from protocols.peers import PeerRecord
from protocols.session import SessionReply
from protocols.transport import PeerUnreachable

SHARD = ShardSpec(1, "bafkshard1", "node", "shards/1.onnx", (), ())


class FakeCaller:
    """Sessions as a node keeps them: the outputs at a step depend on every input so far."""

    def __init__(self, down: set[str]) -> None:
        self.down = down
        self.asked: list[str] = []
        self.sessions: dict[str, float] = {}

    def _reply(self, node: PeerRecord, session: str, x: np.ndarray) -> SessionReply:
        self.asked.append(node.peer_id)
        if node.peer_id in self.down:
            raise PeerUnreachable(f"{node.peer_id} is down")
        total = self.sessions.get(session, 0.0) + float(x.sum())
        self.sessions[session] = total
        out = {"h": np.full((1, x.shape[1], 2), total, np.float32)}
        return SessionReply("r", "step", SHARD.cid, session, 0, x.shape[1], b"i" * 32,
                            b"o" * 32, b"s" * 64, fingerprint(out), out)

    async def open(self, node: PeerRecord, shard: ShardSpec, layout: Any,
                   feeds: dict[str, np.ndarray]) -> SessionReply:
        return self._reply(node, f"{node.peer_id}-{len(self.asked)}", feeds["h"])

    async def step(self, node: PeerRecord, shard: ShardSpec, layout: Any, session: str,
                   feeds: dict[str, np.ndarray], position: int) -> SessionReply:
        return self._reply(node, session, feeds["h"])

    async def close(self, node: PeerRecord, session: str) -> None:
        pass


def hop_with(down: set[str], backed_off: set[str]) -> tuple[SessionHop, FakeCaller, Router]:
    router = Router()
    router.peers = {p: PeerRecord(p, f"did:key:{p}", [], [SHARD.cid]) for p in ("a", "b", "c")}
    for p in backed_off:
        router.failed(p, "it was restarting a moment ago")
    caller = FakeCaller(down)
    hop = SessionHop(caller, router, VerifyPolicy("full", replicas=2), SHARD,  # type: ignore[arg-type]
                     layout=None)  # type: ignore[arg-type]
    return hop, caller, router


def test_a_backed_off_holder_is_asked_when_the_others_cannot_decide() -> None:
    hop, caller, _ = hop_with(down={"a"}, backed_off={"b"})
    feeds = {"h": np.ones((1, 3, 2), np.float32)}
    out = trio.run(hop, feeds)
    assert float(out["h"][0, 0, 0]) == 6.0
    assert "b" in caller.asked and sorted(hop.holders) == ["b", "c"]
    assert caller.asked.index("b") > caller.asked.index("c")  # the reserve comes last
    out = trio.run(hop, {"h": np.ones((1, 1, 2), np.float32)})  # the next step on both
    assert float(out["h"][0, 0, 0]) == 8.0


def test_backed_off_holders_are_not_asked_while_the_planned_ones_decide() -> None:
    hop, caller, _ = hop_with(down=set(), backed_off={"b"})
    trio.run(hop, {"h": np.ones((1, 2, 2), np.float32)})
    assert sorted(caller.asked) == ["a", "c"] and sorted(hop.holders) == ["a", "c"]


def test_with_every_other_holder_down_the_step_fails_and_says_so() -> None:
    hop, caller, _ = hop_with(down={"a", "b"}, backed_off={"b"})
    with pytest.raises(QueryError, match="only one node answered; 3 known to serve it"):
        trio.run(hop, {"h": np.ones((1, 2, 2), np.float32)})
    assert sorted(caller.asked) == ["a", "b", "c"]
