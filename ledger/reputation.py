"""Reputation scores in [0, 1] from a node's counters (``models.Node``), published at ``GET /v1/reputation``.

Soft signals (uptime, success rate, latency, throughput, stake) are smoothed averages, so a node with little history
sits near the middle instead of at an extreme; proven misbehaviour (failed spot checks, slashes) multiplies the score
down hard. Nodes with little counted work are flagged ``new`` so clients can keep some traffic for them.

Every input and where it comes from is listed in docs/economics.md ("Reputation inputs"): work counts only where the
client countersigned it and paid on chain (or holds a reserve) for it; reports only from such clients, once per
nonce, at a bounded rate; spot checks, slashes and stake come from the ledger's own audits and the chain.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

WEIGHTS = {"uptime": 0.2, "success": 0.25, "latency": 0.15, "throughput": 0.1, "spot_checks": 0.2, "stake": 0.1}
LATENCY_REFERENCE_MS = 500.0  # a node this slow scores 0.5 on latency
THROUGHPUT_REFERENCE = 50.0  # tokens/s scoring 0.5
NEW_NODE_RECEIPTS = 100  # below this many counted steps (``Node.work_steps``) a node counts as new
SLASH_FACTOR = 0.25  # each slash multiplies the score by this
SPOT_FAIL_FACTOR = 0.5  # each failed spot check multiplies the score by this


@dataclass
class ReputationScore:
    address: str
    score: float
    new: bool
    components: dict
    receipts: int  # counted work steps (countersigned and backed), not receipts merely submitted
    earned: str  # credit wei of that work
    spot_passed: int
    spot_failed: int
    slashes: int
    stake: str

    def to_json(self) -> dict:
        return asdict(self)


def _smoothed(good: float, total: float, prior: float = 0.5, strength: float = 2.0) -> float:
    return (good + prior * strength) / (total + strength)


def score_node(node, *, reference_stake: int, spot_fail_factor: float = SPOT_FAIL_FACTOR) -> ReputationScore:
    components = {
        "uptime": _smoothed(node.uptime_ok or 0, node.uptime_checks or 0),
        "success": _smoothed(node.successes or 0, (node.successes or 0) + (node.failures or 0)),
        "latency": 0.5 if node.latency_ms is None else LATENCY_REFERENCE_MS / (LATENCY_REFERENCE_MS + node.latency_ms),
        "throughput": 0.5 if node.throughput is None else node.throughput / (node.throughput + THROUGHPUT_REFERENCE),
        "spot_checks": _smoothed(node.spot_passed or 0, (node.spot_passed or 0) + (node.spot_failed or 0), prior=0.75),
        "stake": min(1.0, (node.stake or 0) / reference_stake) if reference_stake > 0 else 0.0,
    }
    base = sum(WEIGHTS[name] * value for name, value in components.items())
    penalty = (SLASH_FACTOR ** (node.slashes or 0)) * (spot_fail_factor ** (node.spot_failed or 0))
    return ReputationScore(
        address=node.address,
        score=round(max(0.0, min(1.0, base * penalty)), 6),
        new=(node.work_steps or 0) < NEW_NODE_RECEIPTS,
        components={k: round(v, 6) for k, v in components.items()},
        receipts=node.work_steps or 0,
        earned=str(node.work_amount or 0),
        spot_passed=node.spot_passed or 0,
        spot_failed=node.spot_failed or 0,
        slashes=node.slashes or 0,
        stake=str(node.stake or 0),
    )


def rank(nodes, *, reference_stake: int, spot_fail_factor: float = SPOT_FAIL_FACTOR) -> list[ReputationScore]:
    scores = [score_node(n, reference_stake=reference_stake, spot_fail_factor=spot_fail_factor) for n in nodes]
    return sorted(scores, key=lambda s: (-s.score, s.address))
