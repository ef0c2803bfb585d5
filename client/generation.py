"""Token selection for ``generate()``: greedy, sampling with temperature/top-k/top-p, repetition penalty, stops.

Reuses transformers' logits processors so results match ``transformers`` for the same settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: Sequence[int] = ()
    pad_token_id: int | None = None
    stop_strings: Sequence[str] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def processors(self) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


def choose_next_tokens(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    params: SamplingParams,
    processors: LogitsProcessorList,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    scores = processors(input_ids, logits.float())
    if params.do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


class StopStringMatcher:
    """Stops a sequence once its decoded continuation contains any stop string (transformers' semantics)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer=... to generate()")
        self.tokenizer, self.stop_strings, self.prompt_length = tokenizer, list(stop_strings), prompt_length

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        done = torch.zeros(sequences.shape[0], dtype=torch.bool)
        if not self.stop_strings:
            return done
        for row in range(sequences.shape[0]):
            text = self.tokenizer.decode(sequences[row, self.prompt_length :], skip_special_tokens=False)
            done[row] = any(stop in text for stop in self.stop_strings)
        return done
