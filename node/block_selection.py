"""Choosing which blocks to host: fill the least-served part of the model, and move when the swarm changes."""

from __future__ import annotations

from collections.abc import Sequence


def block_throughputs(num_blocks: int, spans: Sequence[tuple[int, int, float]]) -> list[float]:
    """Sum of announced throughput per block, from (start, end, throughput) of every online node."""
    totals = [0.0] * num_blocks
    for start, end, throughput in spans:
        for index in range(max(0, start), min(num_blocks, end)):
            totals[index] += throughput
    return totals


def choose_best_start(throughputs: Sequence[float], length: int) -> int:
    """The window whose weakest block is weakest (then the lowest total), so new capacity goes where it is missing."""
    length = min(length, len(throughputs))
    candidates = range(len(throughputs) - length + 1)
    return min(candidates, key=lambda s: (min(throughputs[s : s + length]), sum(throughputs[s : s + length]), s))


def should_move(
    others: Sequence[float], *, current_start: int, length: int, own_throughput: float, balance_quality: float
) -> int | None:
    """A better start for this node, or None. ``others`` excludes this node's own contribution.

    Moving costs a reload, so it only happens when the swarm's weakest block would gain more than 1/balance_quality.
    """

    def swarm_min(start: int) -> float:
        totals = list(others)
        for index in range(start, start + length):
            totals[index] += own_throughput
        return min(totals)

    best = choose_best_start(others, length)
    if best == current_start:
        return None
    now, after = swarm_min(current_start), swarm_min(best)
    if now <= 0 < after or (now > 0 and after * balance_quality > now):
        return best
    return None
