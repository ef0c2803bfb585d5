"""Positions and causal masks for one span step: new tokens at ``[past_length, past_length + T)``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionStep:
    """Where one forward's tokens sit. Queries are absolute positions ``past_length + i``; keys are ``[0, key_length)``.

    Built by ``BlockSpan.forward`` from the cache length; the family runners turn it into position ids / alibi / masks.
    """

    past_length: int
    query_length: int

    @property
    def key_length(self) -> int:
        return self.past_length + self.query_length

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """``[1, T]`` absolute positions, shared by every row of the batch."""
        return torch.arange(self.past_length, self.key_length, device=device).unsqueeze(0)

    def needs_mask(self, sliding_window: int | None = None) -> bool:
        """False when top-left-aligned causal attention (SDPA's ``is_causal``) is already exact."""
        if sliding_window is not None and self.key_length > sliding_window:
            return True
        return self.past_length > 0 and self.query_length > 1

    def causal_mask(
        self, *, dtype: torch.dtype, device: torch.device, sliding_window: int | None = None
    ) -> torch.Tensor:
        """Additive float mask ``[1, 1, T, key_length]``: 0 where query i may see key j, dtype-min elsewhere.

        Float (not bool) so both eager attention (which adds it) and SDPA accept it.
        """
        query_positions = torch.arange(self.past_length, self.key_length, device=device)[:, None]
        key_positions = torch.arange(self.key_length, device=device)[None, :]
        visible = key_positions <= query_positions
        if sliding_window is not None:
            visible &= key_positions > query_positions - sliding_window  # same window rule as transformers
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None]
