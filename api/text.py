"""Turning generated token ids into OpenAI choice text: incremental decoding, stop strings and finish reasons.

A choice never emits text that could still turn out to be the start of a stop string, nor a half-decoded UTF-8
character, so streamed text always equals the final text and never contains the stop string (OpenAI semantics).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what the tokenizer decodes an incomplete multi-byte character to


def _held_suffix(text: str, stops: Sequence[str], end: int) -> int:
    """Length of the longest suffix of ``text[:end]`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), longest, -1):
            if text.endswith(stop[:size], 0, end):
                longest = size
                break
    return longest


def _decoder(tokenizer):
    """``ids -> text`` with special tokens skipped: the Rust tokenizer's own decode where transformers' adds nothing
    to it (a fast tokenizer without space clean-up; saves converting the ids each call), else transformers'."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = type(tokenizer)._decode is PreTrainedTokenizerFast._decode  # no subclass changes decoding
    if backend is not None and plain and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class ChoiceText:
    """The text of one choice as tokens arrive: ``add(token) -> new text to emit``.

    Decoding is incremental (as vLLM and TGI do): each token decodes only a window from the last point where the
    text was whole (no half character at its end) with the tokens just before it as context (merged spaces,
    leading-space rules), so a token costs the window, not the whole answer. Stop strings are searched only where a
    new match can start. Tokenizers that clean up spaces across tokens (``clean_up_tokenization_spaces``) change
    earlier text, so they decode the whole answer every token, as before.

    :param tokenizer: a transformers tokenizer (decodes with special tokens skipped)
    :param stops: stop strings; generation of this choice ends at the first one, which is not emitted
    :param eos_token_ids: tokens that end the choice (counted as completion tokens, never emitted)
    """

    def __init__(self, tokenizer, *, stops: Sequence[str] = (), eos_token_ids: Sequence[int] = ()):
        self.tokenizer, self.stops, self.eos = tokenizer, [s for s in stops if s], set(eos_token_ids)
        self.tokens: list[int] = []  # text tokens (eos excluded)
        self.num_tokens = 0  # completion tokens, eos included
        self.text = ""  # final text so far (the stop string cut off once seen)
        self.emitted = 0  # characters of ``text`` already returned by add()
        self.finish_reason: str | None = None
        self.scores: list[tuple[object, int]] = []  # (the client's score of each token, where it starts in text)
        self.scores_taken = 0  # of ``scores``, how many take_scores() returned
        self._incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode_ids = _decoder(tokenizer)
        self._settled = ""  # text up to token ``_read``: whole, it never changes again
        self._prefix = self._read = 0  # tokens [_prefix, _read) are the context of the window, [_read:] its new part
        self._prefix_text = ""  # decode(tokens[_prefix:_read])
        self._stop_reach = max((len(s) for s in self.stops), default=0) - 1  # a match starts this far back at most

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, score=None) -> str:
        """The new text that ``token_id`` makes safe to emit; ``score`` (its logprobs, if asked) is kept for the
        answer, with where the token starts in the text."""
        if self.finished:
            return ""
        if score is not None:
            self.scores.append((score, len(self.text)))
        self.num_tokens += 1
        if token_id in self.eos:
            self.finish_reason = "stop"
            return self._flush(len(self.text))
        self.tokens.append(int(token_id))
        searched = len(self._settled)  # text before this was searched for stops when it settled
        text = self._decode()
        if self.stops:
            start = max(0, searched - self._stop_reach)
            cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = text[:cut], "stop"
                return self._flush(len(self.text))
        self.text = text
        whole = len(text)  # without a half character at the end, which may yet complete a stop string's prefix
        while whole > self.emitted and text[whole - 1] == REPLACEMENT_CHAR:
            whole -= 1
        return self._flush(whole - _held_suffix(text, self.stops, whole))

    def _decode(self) -> str:
        """The whole text of ``tokens``, decoding only the window since the last whole point."""
        decode, tokens = self._decode_ids, self.tokens
        if not self._incremental:
            return decode(tokens)
        window = decode(tokens[self._prefix :])
        tail = window[len(self._prefix_text) :]
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT_CHAR):
            return self._settled + tail  # a half character (or nothing yet): the window grows until it is whole
        self._settled += tail
        self._prefix, self._read = self._read, len(tokens)
        self._prefix_text = decode(tokens[self._prefix : self._read])
        return self._settled

    def finish(self, reason: str = "length") -> str:
        """Ends the choice (the token budget ran out); returns any text held back so far."""
        if self.finished:
            return ""
        self.finish_reason = reason
        return self._flush(len(self.text))

    def take_scores(self) -> list[tuple[object, int]]:
        """The scores of the tokens added since the last call (what a streamed chunk carries)."""
        taken = self.scores[self.scores_taken :]
        self.scores_taken = len(self.scores)
        return taken

    def _flush(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


class TokenTexts:
    """Each token's own text (``decode([id])``, special tokens kept, as vLLM reports logprob tokens), cached for one
    answer: top-k alternatives repeat the same few tokens."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text

    def prefix_offsets(self, token_ids: Sequence[int]) -> list[int]:
        """Where each token of a prompt starts in its decoded text (special tokens skipped, as echoed). Linear: each
        token's length is what it adds to a decode of a few tokens before it (merged spaces and multi-byte
        characters settle within them)."""
        offsets, total = [], 0
        ids = list(token_ids)
        for i in range(len(ids)):
            offsets.append(total)
            low = max(0, i - 4)
            added = len(self.tokenizer.decode(ids[low : i + 1], skip_special_tokens=True))
            total += max(0, added - len(self.tokenizer.decode(ids[low:i], skip_special_tokens=True)))
        return offsets
