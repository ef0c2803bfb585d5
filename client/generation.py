"""Token selection for ``generate()``: greedy, sampling with temperature/top-k/top-p, repetition penalty, stops,
and the OpenAI options: logit bias, presence/frequency penalties, logprobs of the model's raw distribution.

Reuses transformers' logits processors so results match ``transformers`` for the same settings. Logprobs are always
those of the raw model logits (log-softmax before bias, penalties, grammar mask and temperature, vLLM's default),
so a prompt's score does not depend on how the continuation is sampled.
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
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated (prompt not counted)
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated so far
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    prompt_length: int = 0  # where generated tokens start in the sequences the processors see

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        for token, bias in (self.logit_bias or {}).items():
            if token < 0 or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias maps token ids >= 0 to [-100, 100], got {token}: {bias}")

    def processors(self, vocab_size: int | None = None) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.logit_bias:
            processors.append(LogitBias(self.logit_bias, vocab_size))
        if self.presence_penalty or self.frequency_penalty:
            processors.append(OpenAIPenalties(self.presence_penalty, self.frequency_penalty, self.prompt_length))
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


class LogitBias:
    """Adds a fixed bias to some tokens' logits (OpenAI's ``logit_bias``: +100 forces a token, -100 bans it)."""

    def __init__(self, bias: dict[int, float], vocab_size: int | None):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)
        if vocab_size is not None and len(self.ids) and int(self.ids.max()) >= vocab_size:
            raise ValueError(f"logit_bias names token {int(self.ids.max())}, past the vocabulary ({vocab_size})")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_add(1, self.ids, self.values.expand(scores.shape[0], -1).to(scores.dtype))


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far (the prompt is not counted):
    ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


MAX_TOP_LOGPROBS = 20


@dataclass
class Logprobs:
    """Log-probabilities under the model's raw distribution of ``token_ids`` [B, T], and the ``k`` likeliest
    tokens at each of those positions (``top_ids``/``top_logprobs`` [B, T, k], k may be 0)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, token_ids: torch.Tensor, top: int) -> Logprobs:
        """From logits [B, T, vocab] and the tokens [B, T] chosen at those positions."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(-1, token_ids[..., None].long())[..., 0]
        top_logprobs, top_ids = logprobs.topk(min(top, MAX_TOP_LOGPROBS), dim=-1)
        return cls(token_ids.long(), chosen, top_ids, top_logprobs)


@dataclass
class GenerationStep:
    """One step of ``stream_generate_steps``: the next token of each row and, if asked, their logprobs."""

    tokens: torch.Tensor  # [B]
    logprobs: Logprobs | None = None  # T = 1


@dataclass
class PromptLogprobs:
    """Logprobs of every prompt token after the first, per row (``stream_generate_steps`` yields it first)."""

    logprobs: Logprobs  # T = prompt length - 1


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
