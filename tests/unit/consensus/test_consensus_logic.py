"""Consensus logic: fingerprints, verdicts, reputation, rankings (pure numpy, no network)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from consensus.fingerprint import (
    DEFAULT_K,
    Tolerance,
    check_fingerprint,
    fingerprint,
    fingerprint_bytes,
    fingerprints_agree,
    tensors_agree,
)
from consensus.rankings import Report, aggregate, weighted_median
from consensus.reputation import Reputation
from consensus.verdict import (
    Answer,
    decide,
    detection_probability,
    expected_queries_until_detection,
    group_answers,
)

TOL = Tolerance()
SHAPE = (4, 32, 384)


def activations(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def fp_agree(a: np.ndarray, b: np.ndarray) -> bool:
    return fingerprints_agree(fingerprint({"h": a}), fingerprint({"h": b}), TOL)[0]


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_layout_matches_an_independent_top_k():
    x = activations(0)
    fp = fingerprint({"h": x})
    t = fp["tensors"]["h"]
    assert (fp["v"], fp["k"], t["shape"], t["dtype"]) == (1, DEFAULT_K, list(SHAPE), "float32")
    idx = np.frombuffer(t["idx"], "<u2").reshape(-1, DEFAULT_K)
    val = np.frombuffer(t["val"], "<f4").reshape(-1, DEFAULT_K)
    rows = x.reshape(-1, 384)
    for r in (0, 17, 127):
        expected = sorted(sorted(range(384), key=lambda i: -abs(float(rows[r, i])))[:DEFAULT_K])
        assert idx[r].tolist() == expected
        assert val[r].tolist() == [float(rows[r, i]) for i in expected]
    assert t["sum"] == pytest.approx(math.fsum(map(float, x.ravel())), rel=1e-12)
    assert t["l2"] == pytest.approx(math.sqrt(math.fsum(float(v) ** 2 for v in x.ravel())))


def test_same_tensors_agree():
    x = activations(1)
    fa, fb = fingerprint({"h": x}), fingerprint({"h": x.copy()})
    assert fingerprints_agree(fa, fb, TOL) == (True, "")


def test_honest_noise_agrees():
    x = activations(2)
    noise = np.random.default_rng(3).standard_normal(x.shape)
    y = (x * (1 + 1e-6 * noise)).astype(np.float32)  # like a different thread count
    assert not np.array_equal(x, y)
    assert tensors_agree({"h": x}, {"h": y}, TOL)[0]
    assert fp_agree(x, y)


@pytest.mark.parametrize("kind", ["noise", "zeros", "random", "row_permutation", "other_tensor"])
def test_wrong_answers_disagree(kind):
    x = activations(4)
    rng = np.random.default_rng(5)
    if kind == "noise":
        y = x + (0.1 * x.std() * rng.standard_normal(x.shape)).astype(np.float32)
    elif kind == "zeros":
        y = np.zeros_like(x)
    elif kind == "random":
        y = activations(6)
    elif kind == "row_permutation":  # a stale answer of another input
        flat = x.reshape(-1, SHAPE[-1])
        y = flat[rng.permutation(flat.shape[0])].reshape(SHAPE)
    else:  # another tensor of the same shape (wrong shard): same L2 norm, rotated features
        q, _ = np.linalg.qr(rng.standard_normal((SHAPE[-1], SHAPE[-1])))
        y = (x @ q).astype(np.float32)
        assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-4)
    assert not tensors_agree({"h": x}, {"h": y}, TOL)[0]
    ok, reason = fingerprints_agree(fingerprint({"h": x}), fingerprint({"h": y}), TOL)
    assert not ok and "'h'" in reason


def test_nan_disagrees_even_with_itself():
    x = activations(7, (2, 8, 64))
    y = x.copy()
    y[1, 3, 5] = np.nan
    assert not fp_agree(x, y)
    assert not fp_agree(y, y.copy())
    assert not tensors_agree({"h": y}, {"h": y.copy()}, TOL)[0]
    inf = x.copy()
    inf[0, 0, 0] = np.inf
    assert not fp_agree(x, inf)
    assert fp_agree(inf, inf.copy())  # the same infinity matches, as in np.allclose
    assert not tensors_agree({"h": x}, {"h": inf}, TOL)[0]


def tie_row(swaps: int, big_moved: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose 7th..(6+2*swaps)th magnitudes are near ties, swapped between a and b."""
    a = np.array([10, 9, 8, 7, 6, 5, 0, 0, 0, 0, 1, 0.5, 0.25, 0.1, 0.05, 0.01], np.float32)
    b = a.copy()
    if swaps == 0:
        a[6], a[7], a[8] = 4, 3.0, 2.0
        b = a.copy()
    elif swaps == 1:
        a[6], a[7], a[8] = 4, 3.0, 2.999
        b[6], b[7], b[8] = 4, 2.999, 3.0
    else:
        a[6:10] = [3.0, 3.0, 2.999, 2.999]
        b[6:10] = [2.999, 2.999, 3.0, 3.0]
    if big_moved:  # b's largest value at another index: not a tie
        b[0], b[9] = 0.001, 10
    return a.reshape(1, 16), b.reshape(1, 16)


def test_near_tie_index_swap_agrees():
    a, b = tie_row(1)
    fa, fb = fingerprint({"h": a}), fingerprint({"h": b})
    assert fa["tensors"]["h"]["idx"] != fb["tensors"]["h"]["idx"]
    assert tensors_agree({"h": a}, {"h": b}, TOL)[0]
    assert fingerprints_agree(fa, fb, TOL) == (True, "")


def test_big_value_at_unshared_index_disagrees():
    a, b = tie_row(0, big_moved=True)
    assert abs(float(a.sum()) - float(b.sum())) < 0.01  # sum and l2 cannot tell them apart
    assert len(set(np.flatnonzero(a >= 3)) & set(np.flatnonzero(b >= 3))) == 7
    ok, reason = fingerprints_agree(fingerprint({"h": a}), fingerprint({"h": b}), TOL)
    assert not ok and "row 0" in reason


def test_two_near_ties_are_a_fingerprint_false_alarm():
    a, b = tie_row(2)
    assert tensors_agree({"h": a}, {"h": b}, TOL)[0]
    ok, reason = fingerprints_agree(fingerprint({"h": a}), fingerprint({"h": b}), TOL)
    assert not ok and "shared" in reason


def test_fingerprint_is_much_smaller_than_the_tensor():
    x = activations(8)
    size = fingerprint_bytes(fingerprint({"h": x}))
    ratio = x.nbytes / size
    print(f"fingerprint {size} B vs tensor {x.nbytes} B: ratio {ratio:.1f}")
    assert 128 * DEFAULT_K * 6 <= size < 128 * DEFAULT_K * 6 + 200
    assert ratio > 30


def test_shapes_dtypes_and_names_must_match():
    x = activations(9, (3, 16))
    assert not fingerprints_agree(fingerprint({"h": x}), fingerprint({"g": x}), TOL)[0]
    assert not fp_agree(x, x.astype(np.float64))
    assert not fp_agree(x, x.reshape(6, 8))
    assert not fingerprints_agree(fingerprint({"h": x}, k=4), fingerprint({"h": x}), TOL)[0]
    assert not tensors_agree({"h": x}, {"h": x.reshape(6, 8)}, TOL)[0]


def valid_fp() -> dict:
    return fingerprint({"h": activations(10, (2, 3, 40)), "s": np.float32(3.5)}, k=4)


def test_small_and_odd_tensors_roundtrip():
    fp = fingerprint({"s": np.float32(2), "v": np.arange(3, dtype=np.int64),
                      "e": np.zeros((0, 5), np.float32), "w": np.zeros((2, 0), np.float32)})
    assert check_fingerprint(fp) == fp
    assert fp["tensors"]["v"]["idx"] == np.array([0, 1, 2], "<u2").tobytes()
    assert fingerprints_agree(fp, fp, TOL) == (True, "")


@pytest.mark.parametrize("mutate, message", [
    (lambda fp: fp.update(v=2), "version"),
    (lambda fp: fp.update(k=0), "k must"),
    (lambda fp: fp.update(k=True), "k must"),
    (lambda fp: fp.update(extra=1), "keys"),
    (lambda fp: fp.update(tensors=[]), "map"),
    (lambda fp: fp["tensors"]["h"].update(idx=fp["tensors"]["h"]["idx"][:-2]), "idx has"),
    (lambda fp: fp["tensors"]["h"].update(val=fp["tensors"]["h"]["val"] + b"\0" * 4), "val has"),
    (lambda fp: fp["tensors"]["h"].update(idx="abc"), "bytes"),
    (lambda fp: fp["tensors"]["h"].update(shape=[2, -3, 40]), "shape"),
    (lambda fp: fp["tensors"]["h"].update(idx=np.array([0, 1, 2, 40] * 6, "<u2").tobytes()),
     ">= last"),
    (lambda fp: fp["tensors"]["h"].update(shape=[1 << 30] * 3), "too large"),
    (lambda fp: fp["tensors"]["h"].update(dtype="complex64"), "dtype"),
    (lambda fp: fp["tensors"]["h"].update(sum="1.0"), "sum"),
    (lambda fp: fp["tensors"]["h"].update(l2=-1.0), "l2"),
    (lambda fp: fp["tensors"]["h"].pop("l2"), "keys"),
    (lambda fp: fp["tensors"].update({"": fp["tensors"]["s"]}), "name"),
])
def test_check_fingerprint_rejects_malformed(mutate, message):
    fp = valid_fp()
    assert check_fingerprint(fp) == fp
    mutate(fp)
    with pytest.raises(ValueError, match=message):
        check_fingerprint(fp)
    assert not fingerprints_agree(fp, valid_fp(), TOL)[0]


def test_check_fingerprint_rejects_unsorted_and_oversized():
    fp = valid_fp()
    idx = np.frombuffer(fp["tensors"]["h"]["idx"], "<u2").copy().reshape(-1, 4)
    idx[0] = idx[0][::-1]
    fp["tensors"]["h"]["idx"] = idx.tobytes()
    with pytest.raises(ValueError, match="ascending"):
        check_fingerprint(fp)
    many = {"v": 1, "k": 1, "tensors": {f"t{i}": valid_fp()["tensors"]["s"] for i in range(65)}}
    with pytest.raises(ValueError, match="at most"):
        check_fingerprint(many)
    with pytest.raises(ValueError):
        check_fingerprint("not a map")


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.float32, np.float64, np.int32, np.uint8]).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
                          elements=st.floats(-100, 100, width=32)
                          if np.dtype(dt).kind == "f" else None)),
       st.integers(1, 12))
def test_fingerprint_of_any_tensor_is_valid_and_self_consistent(x, k):
    fp = fingerprint({"x": x}, k=k)
    assert check_fingerprint(fp) == fp
    assert fingerprints_agree(fp, fingerprint({"x": x.copy()}, k=k), TOL) == (True, "")


# --- verdicts ----------------------------------------------------------------------------------


def answer(node: str, x: np.ndarray, full: bool = False) -> Answer:
    return Answer(node, fingerprint({"h": x}), {"h": x} if full else None)


def test_three_answers_two_agree():
    x = activations(11, (2, 8, 64))
    v = decide([answer("c", x), answer("a", activations(12, (2, 8, 64))),
                answer("b", x * np.float32(1 + 1e-7))], TOL)
    assert v.decided and v.winners == ("b", "c") and v.losers == ("a",)
    assert v.groups == (("b", "c"), ("a",))
    assert v.to_json() == {"winners": ["b", "c"], "losers": ["a"],
                           "groups": [["b", "c"], ["a"]], "decided": True, "reason": v.reason}


def test_two_disagreeing_answers_are_undecided():
    v = decide([answer("a", activations(13, (4, 16))), answer("b", activations(14, (4, 16)))], TOL)
    assert not v.decided and v.winners == () and v.losers == ()
    assert sorted(map(len, v.groups)) == [1, 1]


def test_two_two_split_is_undecided():
    x, y = activations(15, (4, 16)), activations(16, (4, 16))
    v = decide([answer("a", x), answer("b", y), answer("c", x), answer("d", y)], TOL)
    assert not v.decided and v.winners == () and v.groups == (("a", "c"), ("b", "d"))


def test_single_answer_wins_unchecked():
    v = decide([answer("a", activations(17, (4, 16)))], TOL)
    assert v.decided and v.winners == ("a",) and v.losers == ()
    assert not decide([], TOL).decided


def test_fingerprint_false_alarm_is_resolved_by_full_tensors():
    a, b = tie_row(2)
    liar = np.zeros_like(a)
    answers = [answer("a", a), answer("b", b), answer("c", liar)]
    assert not decide(answers, TOL).decided  # fingerprints alone split the honest pair
    calls = []

    def fetch(node: str):
        calls.append(node)
        return {"h": {"a": a, "b": b, "c": liar}[node]}

    v = decide(answers, TOL, fetch_full=fetch)
    assert v.decided and v.winners == ("a", "b") and v.losers == ("c",)
    assert sorted(calls) == sorted(set(calls))  # each node fetched at most once
    inline = decide([answer("a", a, full=True), answer("b", b, full=True), answer("c", liar)], TOL)
    assert inline.winners == ("a", "b")


def test_failing_fetch_counts_as_unavailable():
    a, b = tie_row(2)

    def fetch(node: str):
        raise TimeoutError(node)

    assert group_answers([answer("a", a), answer("b", b)], TOL, fetch) == [["a"], ["b"]]
    with pytest.raises(ValueError, match="twice"):
        group_answers([answer("a", a), answer("a", b)], TOL)


def test_detection_probability_formula_and_monte_carlo():
    assert detection_probability(0.2, 1, 30) == pytest.approx(1 - 0.8**30)
    assert detection_probability(0.2, 1, 30) == pytest.approx(0.99876, abs=1e-5)
    assert expected_queries_until_detection(0.2, 1) == pytest.approx(5.0)
    assert expected_queries_until_detection(0.0, 3) == math.inf
    rng = np.random.default_rng(18)
    trials = 20_000
    for p, h, q in ((0.2, 1, 1), (0.1, 3, 2), (0.05, 2, 5)):
        caught = (rng.random((trials, h * q)) < p).any(axis=1).mean()
        expected = detection_probability(p, h, q)
        sigma = math.sqrt(expected * (1 - expected) / trials)
        assert abs(caught - expected) <= 3 * sigma, (p, h, q, caught, expected)
    with pytest.raises(ValueError):
        detection_probability(1.5, 1)


# --- reputation --------------------------------------------------------------------------------


def test_reputation_priors_and_ema_closed_form():
    rep = Reputation(half_life=10)
    st0 = rep.stats("new")
    assert (st0.agreement, st0.availability, st0.observations, st0.caught) == (0.5, 1.0, 0, False)
    for _ in range(10):
        rep.record_verdict("n", True)
    # after h observations of 1 from the prior 0.5, the gap to 1 has halved exactly once
    assert rep.stats("n").agreement == pytest.approx(0.75)
    rep.record_latency("n", 50)
    assert rep.stats("n").latency_ms == 50
    assert rep.score("n") == pytest.approx(0.7 * 0.75 + 0.2 * 1.0 + 0.1 / 1.5)
    rep.record_verdict("n", False)
    assert rep.stats("n").caught and rep.score("n") <= rep.stats("n").agreement
    again = Reputation.from_json(rep.to_json())
    assert again.report() == rep.report() and again.stats("n") == rep.stats("n")


def test_liar_after_honest_history_drops_below_honest_nodes():
    half_life = 20
    rep = Reputation(half_life=half_life)
    nodes = ["h1", "h2", "liar"]
    for _ in range(50):
        for n in nodes:
            rep.record_verdict(n, True)
            rep.record_availability(n, True)
            rep.record_latency(n, 80)
    for step in range(1, half_life + 1):
        rep.record_verdict("h1", True)
        rep.record_verdict("h2", True)
        rep.record_verdict("liar", False)
        if step == 1:
            assert rep.score("liar") < min(rep.score("h1"), rep.score("h2"))
    honest = 1 - 0.5 * 0.5 ** (50 / half_life)
    assert rep.stats("liar").agreement == pytest.approx(honest * 0.5)  # halved in half_life
    assert rep.score("liar") < 0.5 < rep.score("h1")


# --- rankings ----------------------------------------------------------------------------------


def test_weighted_median_tie_rule():
    assert weighted_median([3, 1, 2], [1, 1, 1]) == 2
    assert weighted_median([1, 2], [1, 1]) == 1  # exactly half at 1: the lower value
    assert weighted_median([1, 2, 3], [1, 0, 3]) == 3
    assert weighted_median([5, 1], [0.4, 0.6]) == 1
    with pytest.raises(ValueError):
        weighted_median([1], [0])


def test_aggregate_rows_and_clipping():
    reports = [Report("r1", 1, {"a": 0.9, "b": 0.2}), Report("r2", 1, {"a": 0.8, "b": 0.3}),
               Report("r3", 1, {"a": 0.0, "b": 1.0}), Report("r4", 0, {"a": 0.0})]
    rows = aggregate(reports)
    assert [r["node"] for r in rows] == ["a", "b"]
    assert rows[0] == {"node": "a", "score": 0.8, "median": 0.8, "reporters": 3, "weight": 3.0}
    assert rows[1]["score"] == 0.3
    split = aggregate([Report("r1", 1, {"a": 0.2}), Report("r2", 1, {"a": 0.6})])
    assert split[0]["score"] == pytest.approx(0.4) and split[0]["median"] == 0.2
    assert aggregate(reports, min_reporters=4) == []
    with pytest.raises(ValueError):
        aggregate([Report("r", 1, {"a": 1.5})])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_dishonest_minority_cannot_leave_the_honest_span(data):
    nodes = ["n0", "n1", "n2"]
    unit = st.floats(0, 1)
    honest = [Report(f"h{i}", data.draw(st.floats(0.01, 10)), {n: data.draw(unit) for n in nodes})
              for i in range(data.draw(st.integers(1, 5)))]
    honest_weight = sum(Fraction(r.weight) for r in honest)
    liars = []
    for i in range(data.draw(st.integers(0, 5))):
        scored = data.draw(st.lists(st.sampled_from(nodes), unique=True))
        liars.append(Report(f"d{i}", data.draw(st.floats(0, 10)),
                            {n: data.draw(st.sampled_from([0.0, 1.0]) | unit) for n in scored}))
    assume(sum(Fraction(r.weight) for r in liars) < honest_weight)
    rows = {r["node"]: r["score"] for r in aggregate(honest + liars)}
    for n in nodes:
        span = [r.scores[n] for r in honest]
        assert min(span) <= rows[n] <= max(span)


def test_exactly_half_the_weight_can_move_the_score():
    # the guarantee needs a strict majority: at 50% the liars reach the middle of the band
    honest = [Report("h", 1, {"a": 0.9})]
    rows = aggregate([*honest, Report("d", 1, {"a": 0.0})])
    assert rows[0]["score"] < 0.9


def test_node_that_loses_most_verdicts_ranks_last():
    reports = []
    rng = np.random.default_rng(19)
    for c in range(5):
        rep = Reputation()
        for _ in range(60):
            for n in ("good1", "good2", "good3"):
                rep.record_verdict(n, bool(rng.random() < 0.95))
            rep.record_verdict("bad", bool(rng.random() < 0.2))
        reports.append(Report(f"client{c}", 1.0, {n: s["score"] for n, s in rep.report().items()}))
    reports.append(Report("sybil", 2.0, {"bad": 1.0, "good1": 0.0}))  # 2/7 of the weight
    rows = aggregate(reports)
    assert rows[-1]["node"] == "bad"
    assert all(r["score"] > 0.5 for r in rows[:-1])
