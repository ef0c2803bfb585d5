"""Streamed chunks spliced from a template are byte for byte the events a dumped model gives, for any text."""

from __future__ import annotations

import random

from nectar.api.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
)
from nectar.api.serving.generation import TEXT_MARK, sse, templated_sse

ALPHABET = ['"', "\\", "\n", "\t", "\r", "\x00", "\x1f", "\x7f", "/", "<", "é", "€", "🧀", "\u2028", "\ufffd", "a", " "]


def completion(index: int, reason, model: str = "smollm2-135m"):
    def build(text: str) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id="cmpl-1",
            created=1,
            model=model,
            choices=[CompletionStreamChoice(index=index, text=text, logprobs=None, finish_reason=reason)],
        )

    return build


def chat(index: int):
    def build(text: str) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id="chatcmpl-1",
            created=1,
            model="smollm2-135m",
            choices=[ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text))],
        )

    return build


def test_templated_events_equal_dumped_models():
    rng = random.Random(7)
    templates: dict = {}
    for i in range(2000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 12)))
        index, reason = rng.randrange(3), rng.choice([None, "stop", "length"])
        kind = i % 2
        build = completion(index, reason) if kind == 0 else chat(index)
        key = (kind, index, reason)
        assert templated_sse(templates, key, build, text) == sse(build(text)), text
    assert len(templates) <= 2 * 3 * 3


def test_a_mark_outside_the_text_falls_back_to_the_model():
    build = completion(0, None, model=f"odd{TEXT_MARK}name")
    assert templated_sse({}, 0, build, "hi") == sse(build("hi"))
