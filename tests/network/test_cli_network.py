"""The installed ``veilnet`` command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_help_as_subprocess() -> None:
    script = Path(sys.executable).parent / "veilnet"
    assert script.is_file(), "the console script is installed with the package"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: veilnet" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "node.cli", "model", "import", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: veilnet model import" in proc.stdout and "--cut" in proc.stdout
