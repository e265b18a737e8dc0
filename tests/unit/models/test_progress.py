"""models/progress.py: step lines with elapsed seconds and bars on a terminal, plain lines on a
pipe, nothing with quiet; and the long commands' progress on stderr, their results on stdout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from models.progress import Reporter, counted
from node.cli import main

REPO = Path(__file__).resolve().parents[3]
STEP = re.compile(r"^veilnet: \[ *\d+\.\ds\] \S")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pipe_gets_step_lines_with_elapsed_time() -> None:
    out, clock = StringIO(), FakeClock()
    report = Reporter(prefix="veilnet: ", file=out, clock=clock)
    report("loading model.onnx")
    clock.now += 3.24
    report.step("splitting at [2] cuts")  # brackets are text, not markup
    assert out.getvalue() == ("veilnet: [  0.0s] loading model.onnx\n"
                              "veilnet: [  3.2s] splitting at [2] cuts\n")


def test_pipe_bar_is_coarse_lines_without_carriage_returns() -> None:
    out, clock = StringIO(), FakeClock()
    report = Reporter(prefix="veilnet: ", file=out, clock=clock, interval=5.0)
    with report.bar("writing shards", total=12, unit="shards") as bar:
        for _ in range(12):
            clock.now += 1.0
            bar.advance()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert all(STEP.match(line) for line in lines), lines
    assert lines[0] == "veilnet: [  0.0s] writing shards: 0/12 shards"
    assert lines[1] == "veilnet: [  5.0s] writing shards: 5/12 shards"
    assert lines[2] == "veilnet: [ 10.0s] writing shards: 10/12 shards"
    assert lines[3] == "veilnet: [ 12.0s] writing shards: 12/12 shards in 12.0s"
    assert len(lines) == 4  # not one per advance


def test_bytes_are_counted_in_mb() -> None:
    out = StringIO()
    report = Reporter(file=out)
    with report.bar("installing shards", total=3_000_000, unit="B") as bar:
        bar.advance(1_500_000)
        bar.advance(1_500_000)
    assert out.getvalue().splitlines()[-1].endswith("installing shards: 3.0/3.0 MB in 0.0s")


def test_quiet_writes_nothing() -> None:
    out = StringIO()
    report = Reporter(prefix="veilnet: ", file=out, quiet=True, interval=0.0)
    report("a step")
    with report.bar("writing shards", total=3, unit="shards") as bar:
        bar.advance(3)
    with counted(report, "more", 2) as bar:
        bar.set(2)
    assert out.getvalue() == ""


def test_a_plain_callable_gets_only_steps() -> None:
    seen: list[str] = []
    with counted(seen.append, "writing shards", 3, "shards") as bar:
        bar.advance()
        bar.set(3)
    assert seen == []


def test_terminal_renders_a_rich_bar() -> None:
    console = Console(force_terminal=True, file=StringIO(), width=100)
    report = Reporter(prefix="veilnet: ", console=console)
    assert report.terminal
    report("splitting")
    with report.bar("writing shards", total=4, unit="shards") as bar:
        bar.advance(2)
        with report.bar("fetching", total=2e6, unit="B") as inner:  # nested: one live display
            inner.advance(1e6)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "━" in text and "2/4 shards" in text and "0.0/2.0 MB" in text
    assert "\r" in text  # redrawn in place
    assert "splitting" in text
    assert "writing shards: 2/4 shards in" in text  # the summary line the bar leaves


def test_a_real_stderr_pipe_is_not_a_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as f:
        assert not Reporter(file=f).terminal


# --- the commands ---------------------------------------------------------------------------


def _encrypt(minilm_dir: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "model", "encrypt", str(minilm_dir), "--out", str(out),
         "--seed", "11", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_encrypt_on_a_pipe_and_quiet(minilm_dir: Path, tmp_path: Path) -> None:
    loud = _encrypt(minilm_dir, tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr
    lines = loud.stderr.splitlines()
    assert "\r" not in loud.stderr and "\x1b" not in loud.stderr
    assert lines and all(STEP.match(line) for line in lines), lines
    assert any("transforming shards: 4/4 shards in" in line for line in lines), lines
    result = json.loads(loud.stdout)  # stdout is only the result
    assert set(result) == {"manifest", "cid", "encryption", "key", "node_shards"}

    quiet = _encrypt(minilm_dir, tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    again = json.loads(quiet.stdout)
    assert again["cid"] == result["cid"]  # same seed, same deployment: the result is unchanged
    assert again["node_shards"] == result["node_shards"]


def test_add_shards_counts_bytes(capsys: pytest.CaptureFixture[str], deployment_dir: Path,
                                 tmp_path: Path) -> None:
    assert main(["node", "add-shards", str(tmp_path / "d"), str(deployment_dir)]) == 0
    out, err = capsys.readouterr()
    installed = json.loads(out)["shards"]
    assert len(installed) == 2
    lines = err.splitlines()
    assert all(STEP.match(line) for line in lines), lines
    assert re.search(r"installing shards: (\d+\.\d)/\1 MB in", err), err

    assert main(["node", "add-shards", "-q", str(tmp_path / "e"), str(deployment_dir),
                 "--shard", installed[1]]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["shards"] == [installed[1]] and err == ""
