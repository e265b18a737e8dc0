"""Consensus checks: output fingerprints, verdicts over replicated hops, a client's reputation
view of nodes, and robust aggregation of many reporters' scores into rankings.
See docs/consensus.md."""

from consensus.fingerprint import (
    Tolerance,
    check_fingerprint,
    fingerprint,
    fingerprint_bytes,
    fingerprints_agree,
    tensors_agree,
)
from consensus.rankings import Report, aggregate, weighted_median
from consensus.reputation import NodeStats, Reputation
from consensus.verdict import (
    VERIFY_MODES,
    Answer,
    Verdict,
    decide,
    detection_probability,
    group_answers,
)

__all__ = [
    "VERIFY_MODES",
    "Answer", "NodeStats", "Report", "Reputation", "Tolerance", "Verdict", "aggregate",
    "check_fingerprint", "decide", "detection_probability", "fingerprint", "fingerprint_bytes",
    "fingerprints_agree", "group_answers", "tensors_agree", "weighted_median",
]
