"""What a node may call on a family's fast path for inference steps (``ModelFamily.batch_runner``).

A node hosts one single-block ``BlockSpan`` per block and, each round, hands its compute thread's pending steps to
the family's ``BatchRunner`` (several sessions' tokens in one forward). A family without one (its
``batch_runner`` returns None) takes the generic path: ``BlockSpan.forward``, one session at a time. Which sessions
share a round, and which rounds are recorded as CUDA graphs, is the node's business (``nectar.node``); a runner
only computes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class SpanStep:
    """One session's step: [B, T, H] new tokens at ``position`` through blocks [start, end), each block's
    ``SpanCache`` in ``caches`` (the runner appends the tokens' keys/values and advances their lengths)."""

    hidden: torch.Tensor
    caches: list
    start: int
    end: int
    position: int
    prompts: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    @property
    def batchable(self) -> bool:
        """False for a first step with deep prompts: it runs alone, through the generic path."""
        return self.prompts is None or self.position != 0


class BatchRunner(ABC):
    """A family's batched forward through a node's blocks (one single-block ``BlockSpan`` per block).

    ``run`` is required. ``static_step`` (with ``static_positions`` > 0) lets the node record decode rounds as CUDA
    graphs: one token of each session with shapes that do not depend on the positions (no host syncs).
    """

    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    static_positions: int = 0  # positions ``static_step`` can take (all below this); 0: it has none
    static_max_rows: int | None = None  # the most sessions one recorded round may hold (None: the recorder's own cap)

    @abstractmethod
    def run(self, steps: Sequence[SpanStep], first_block: int) -> list[torch.Tensor]:
        """Every step through its blocks (local indices from ``first_block``, the node's first block being 0);
        returns each step's [B, T, H] output on the device. Steps are batchable (``SpanStep.batchable``)."""

    def describe(self) -> str:
        """How it computes, for the node's log (e.g. which routes it measured and chose at load)."""
        return type(self).__name__

    def static_step(
        self, x: torch.Tensor, positions: torch.Tensor, caches: list, first_block: int, pools: list | None = None
    ) -> torch.Tensor:
        """One token of each of n sessions: ``x`` [n, hidden], ``positions`` [n] (a device tensor: each session's
        cache length), ``caches[i]`` session i's SpanCaches (one per block); ``pools``: per block, the same sessions'
        keys/values moved into one tensor [n, 2, kv_heads, max_length, head_dim] (each SpanCache's buffer a view of
        its row). Writes the new keys/values; leaves the caches' lengths to the caller. Returns [n, hidden]."""
        raise NotImplementedError(f"{type(self).__name__} has no static step: set static_positions = 0")

    def paged_step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        storage: torch.Tensor,
        first_block: int,
        num_blocks: int,
    ) -> torch.Tensor:
        """``static_step`` over a ``PagePool`` (``nectar.models.paged``): ``x`` [n, hidden], ``positions`` [n],
        ``tables`` [n, width] each row's pages (the scratch page past its own and for rows of no session),
        ``storage`` the pool's [blocks, pages, page_size, 2, kv_heads, head_dim]. Writes the new keys/values through
        the tables and attends over the pages they list, masked past each row's position. Returns [n, hidden]."""
        raise NotImplementedError(f"{type(self).__name__} has no paged step: set pages = False")

    pages: bool = False  # whether ``paged_step`` is implemented

    def kernels(self) -> contextlib.AbstractContextManager:
        """The kernel choices (e.g. attention backends) a recorded step runs under, as ``run`` uses them."""
        return contextlib.nullcontext()
