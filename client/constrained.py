"""Constrained decoding: a JSON schema as a mask over each row's next-token logits (``response_format``).

llguidance (a maintained Rust grammar engine, also used by vLLM and SGLang) compiles the schema into a matcher that
knows, after every token, which tokens may come next; the sampler sets every other logit to -inf before sampling, so
any sampled or greedy output is a prefix of a valid document, and a whole one once the matcher lets EOS through.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref

import torch

logger = logging.getLogger(__name__)

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # building one costs ~0.3 s for 49k tokens
_LOCK = threading.Lock()
# compact separators: an untrained model left free whitespace can emit it until max_tokens runs out
_JSON_DEFAULTS = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """The schema cannot be compiled into a grammar; the message says why."""


def _ll_tokenizer(tokenizer):
    import llguidance.hf

    with _LOCK:
        built = _TOKENIZERS.get(tokenizer)
        if built is None:
            built = _TOKENIZERS[tokenizer] = llguidance.hf.from_tokenizer(tokenizer)
        return built


def json_schema_grammar(tokenizer, schema: dict | bool) -> str:
    """The llguidance grammar of a JSON schema (``{"type": "object"}`` for any JSON object), checked against
    ``tokenizer``; raises ConstraintError naming what is wrong with the schema."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_DEFAULTS)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, _ll_tokenizer(tokenizer))
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConstraintError(f"the JSON schema cannot be used: {e}") from None
    if failed:
        raise ConstraintError(f"the JSON schema cannot be used: {'; '.join(messages)[:500]}")
    return grammar


class GrammarMask:
    """One grammar matcher per row; ``apply`` masks the logits of the rows still generating, ``advance`` feeds each
    row the token it got.

    :param tokenizer: the model's transformers tokenizer
    :param grammar: from ``json_schema_grammar``
    :param batch_size: rows generated together
    :param eos_token_id: what a row may emit if its matcher allows nothing (it then ends instead of failing)
    """

    def __init__(self, tokenizer, grammar: str, *, batch_size: int, eos_token_id: int):
        import llguidance.torch as llt
        from llguidance import LLMatcher

        self._llt = llt
        lltok = _ll_tokenizer(tokenizer)
        self.matchers = [LLMatcher(lltok, grammar, log_level=0) for _ in range(batch_size)]
        for matcher in self.matchers:
            if matcher.is_error():
                raise ConstraintError(f"the JSON schema cannot be used: {matcher.get_error()}")
        self.bitmask = llt.allocate_token_bitmask(batch_size, lltok.vocab_size)
        self.eos_token_id = eos_token_id
        self._bits = torch.arange(32, dtype=torch.int32)

    def apply(self, scores: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``scores`` [B, vocab] with every token the grammar forbids at -inf (rows not ``active`` untouched)."""
        for row, matcher in enumerate(self.matchers):
            if active[row]:
                self._llt.fill_next_token_bitmask(matcher, self.bitmask, row)
        allowed = ((self.bitmask[:, :, None] >> self._bits) & 1).bool().reshape(len(self.matchers), -1)
        vocab = scores.shape[-1]
        allowed = allowed[:, :vocab]
        if allowed.shape[1] < vocab:  # the model's padded vocabulary past the tokenizer's: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab - allowed.shape[1])], dim=1)
        nothing = ~allowed.any(dim=1)
        allowed[nothing, self.eos_token_id] = True  # a dead end ends the row rather than sampling from NaN
        allowed[~active] = True
        return scores.masked_fill(~allowed, float("-inf"))

    def advance(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        for row, matcher in enumerate(self.matchers):
            if active[row] and not matcher.is_stopped():
                if not matcher.consume_token(int(tokens[row])):
                    logger.warning(f"Grammar rejected token {int(tokens[row])}: {matcher.get_error()}")
