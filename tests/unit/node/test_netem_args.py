"""The ``tc netem`` argument parser of scripts/netem.py (``testnet.py up --netem ARGS``) and the
per-testnet namespace tag; no namespace is created here (tests/network/test_netem.py does)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
from netem import Netem, NetemError, parse_netem, tag_for  # noqa: E402


def test_delay_jitter_and_loss_as_in_the_issue() -> None:
    spec = parse_netem("delay 40ms 10ms loss 1%")
    assert spec == Netem(delay_s=0.04, jitter_s=0.01, loss=0.01)
    assert spec.duplicate == 0.0 and spec.rate_bps is None and spec.limit == 1000


@pytest.mark.parametrize(("text", "expected"), [
    ("", Netem()),
    ("delay 20ms", Netem(delay_s=0.02)),
    ("delay 1.5s", Netem(delay_s=1.5)),
    ("delay 200us 50usec", Netem(delay_s=200e-6, jitter_s=50e-6)),
    ("delay 400", Netem(delay_s=400e-6)),  # tc: a bare time is in microseconds
    ("loss random 5%", Netem(loss=0.05)),
    ("loss 0.5", Netem(loss=0.005)),  # tc: a bare percentage
    ("duplicate 2%", Netem(duplicate=0.02)),
    ("rate 10mbit", Netem(rate_bps=10e6)),
    ("rate 1gbit", Netem(rate_bps=1e9)),
    ("rate 500kbps", Netem(rate_bps=4e6)),  # tc: bps is bytes per second
    ("limit 50", Netem(limit=50)),
    ("LOSS 1% Delay 5ms", Netem(delay_s=0.005, loss=0.01)),
])
def test_supported_words(text: str, expected: Netem) -> None:
    assert parse_netem(text) == expected
    assert parse_netem(text.split()) == expected  # an argv list works too


@pytest.mark.parametrize(("text", "named"), [
    ("corrupt 1%", "'corrupt' is not supported"),
    ("reorder 25% 50%", "'reorder' is not supported"),
    ("delay 10ms 5ms distribution normal", "'distribution' is not supported"),
    ("delay 10ms 5ms 25%", "correlation values are not supported"),
    ("loss 1% 25%", "correlation values are not supported"),
    ("loss state 1 2", "loss model 'state' is not supported"),
    ("slot 10ms", "'slot' is not supported"),
    ("delay", "'delay' needs a time"),
    ("delay fast", "'delay' needs a time"),
    ("delay 10parsecs", "not a time"),
    ("loss", "'loss' needs a percentage"),
    ("loss 150%", "more than 100%"),
    ("loss 1x", "not a percentage"),
    ("rate 10furlongs", "not a rate"),
    ("rate 0", "must be above 0"),
    ("limit 0", "not a number of packets"),
    ("delay 10ms delay 20ms", "given twice"),
])
def test_errors_name_the_word(text: str, named: str) -> None:
    with pytest.raises(NetemError, match=named.replace("(", r"\(")):
        parse_netem(text)


def test_netem_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="supported: delay, loss, duplicate, rate, limit"):
        parse_netem("gap 5")


def test_tag_is_stable_per_directory_and_differs_between_them(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert tag_for(a) == tag_for(str(a))
    assert len(tag_for(a)) == 6 and tag_for(a) != tag_for(b)
    # device names (tag + host) must fit Linux's 15 characters for the usual hosts
    assert len(f"vn{tag_for(a)}client") <= 15
