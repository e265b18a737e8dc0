"""node/fair.py: fair queueing of shard runs between peers, and the per-peer limits."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from node.fair import Busy, FairLimiter
from node.sessions import SessionLimits, SessionTable


async def _run_jobs(limiter: FairLimiter, jobs: list[tuple[str, int]],
                    done: list[tuple[str, int]]) -> None:
    """Submit ``jobs`` (peer, number) in list order, each holding its slot for about a second
    of the test's clock (no two ending at once); records the order in which they got a slot."""
    async def one(peer: str, n: int, hold: float) -> None:
        async with limiter.slot(peer):
            done.append((peer, n))
            await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        for i, (peer, n) in enumerate(jobs):
            nursery.start_soon(one, peer, n, 1 + i / 1000)
            await trio.testing.wait_all_tasks_blocked()


def run(jobs: list[tuple[str, int]], total: int = 1, per_peer: int = 100,
        total_waiting: int = 100) -> list[tuple[str, int]]:
    done: list[tuple[str, int]] = []
    limiter = FairLimiter(total, per_peer, total_waiting)
    trio.run(_run_jobs, limiter, jobs, done, clock=trio.testing.MockClock(autojump_threshold=0))
    assert limiter.running == 0 and limiter.waiting == 0
    return done


def test_a_late_peer_runs_before_a_flooders_backlog() -> None:
    jobs = [("flood", i) for i in range(6)] + [("honest", 0)]
    order = run(jobs)
    # FIFO would run it last; fair queueing runs it right after the run in progress
    assert order.index(("honest", 0)) == 1
    assert [n for p, n in order if p == "flood"] == list(range(6))  # a peer's own order kept


def test_backlogged_peers_alternate() -> None:
    jobs = [("a", i) for i in range(4)] + [("b", i) for i in range(4)] + [("c", 0), ("c", 1)]
    # after a's first run, one run per peer with work waiting per round, in arrival order
    assert "".join(p for p, _ in run(jobs)) == "abcabcabab"


def test_several_slots_are_all_used() -> None:
    order = run([("a", i) for i in range(3)] + [("b", 0)], total=2)
    assert order[:2] == [("a", 0), ("a", 1)]
    assert order[2] == ("b", 0)


def busy_reason(limiter: FairLimiter, peers: list[str], extra: str) -> str:
    async def main() -> str:
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(hold, peer)
                await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(Busy) as info:
                async with limiter.slot(extra):
                    pass
            nursery.cancel_scope.cancel()
        return info.value.reason

    async def hold(peer: str) -> None:
        async with limiter.slot(peer):
            await trio.sleep_forever()

    reason = trio.run(main)
    assert limiter.running == 0 and limiter.waiting == 0  # cancelled waiters left no trace
    return reason


def test_per_peer_and_node_queue_limits() -> None:
    # one running + 2 waiting for "a": a third waiter of "a" is refused, "b" still queues
    assert busy_reason(FairLimiter(1, 2, 10), ["a", "a", "a"], "a") == "peer_queue"
    assert busy_reason(FairLimiter(1, 2, 3), ["a", "a", "a", "b"], "c") == "node_queue"


def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    limiter = FairLimiter(1, 10, 10)
    order: list[str] = []

    async def main() -> None:
        async def job(peer: str, scope: trio.CancelScope | None = None) -> None:
            with scope or trio.CancelScope():
                async with limiter.slot(peer):
                    order.append(peer)
                    await trio.sleep(1)

        leaving = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(job, "leaves", leaving)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(job, "stays")
            await trio.testing.wait_all_tasks_blocked()
            leaving.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert order == ["first", "stays"]
    assert limiter.running == 0 and limiter.waiting == 0


def test_busy_frames_name_the_limit() -> None:
    frame: dict[str, Any] = Busy("peer_queue", "too many", retry_after=2.0).to_message("r1")
    assert frame["id"] == "r1"
    assert frame["error"] == {"code": "busy", "message": "too many", "reason": "peer_queue",
                              "retry_after": 2.0}
    with pytest.raises(ValueError, match="unknown busy reason"):
        Busy("tired", "no")


def test_one_peer_holds_at_most_half_of_the_sessions() -> None:
    table = SessionTable(SessionLimits(max_sessions=5), lambda: 0.0, lambda reason: None)
    io: Any = object()
    for _ in range(3):
        table.open("greedy", "cid", io, 1)
    with pytest.raises(Busy) as info:
        table.open("greedy", "cid", io, 1)
    assert info.value.reason == "peer_sessions"
    table.open("other", "cid", io, 1)
    table.open("other", "cid", io, 1)
    with pytest.raises(Busy) as info:
        table.open("third", "cid", io, 1)
    assert info.value.reason == "node_sessions"


def test_a_peer_over_its_share_waits_unread_and_others_pass() -> None:
    limiter = FairLimiter(1, 2, 10)
    order: list[str] = []

    async def main() -> None:
        await limiter.admit("flood")
        await limiter.admit("flood")  # its share: two requests in hand

        async def third() -> None:
            await limiter.admit("flood")
            order.append("flood admitted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            await limiter.admit("honest")  # another peer is not held back
            order.append("honest admitted")
            limiter.unadmit("flood")  # one of the flooder's requests is answered
            await trio.testing.wait_all_tasks_blocked()
        for peer in ("flood", "flood", "honest"):
            limiter.unadmit(peer)

    trio.run(main)
    assert order == ["honest admitted", "flood admitted"]
