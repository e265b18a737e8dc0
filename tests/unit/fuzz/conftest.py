"""The fuzz tests' budget and their record of inputs run.

fuzzkit (imported here first) registers the hypothesis profiles and loads ``ci`` (``make
test``: fixed examples per target, derandomized, no example database) or ``long`` under
``VEILNET_FUZZ=long`` (``make fuzz``). At the end of the session the number of inputs each target
ran is printed in one line and, when ``VEILNET_FUZZ_REPORT`` names a file, written there as
JSON ``{"profile": ..., "targets": {target: inputs}, "total": n}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fuzzkit


def pytest_terminal_summary(terminalreporter: Any) -> None:
    counts = dict(sorted(fuzzkit.COUNTS.items()))
    if not counts:
        return
    total = sum(counts.values())
    terminalreporter.write_line(
        f"fuzz ({fuzzkit.PROFILE} profile): {total} inputs over {len(counts)} targets; "
        + ", ".join(f"{k}={v}" for k, v in counts.items()))
    report = os.environ.get("VEILNET_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(
            {"profile": fuzzkit.PROFILE, "targets": counts, "total": total}, indent=1) + "\n")
        terminalreporter.write_line(f"fuzz report written to {report}")
