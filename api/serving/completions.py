"""``OpenAIServingCompletion``: ``POST /v1/completions``, whole or streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nectar.api.errors import bad_request
from nectar.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from nectar.api.serving.base import Auth, Target
from nectar.api.serving.generation import Generation, GenerationServing, PrimedStream, sse

logger = logging.getLogger(__name__)


class OpenAIServingCompletion(GenerationServing):
    """Text completions over the swarm; each prompt is one swarm session with ``n`` rows."""

    kind, id_prefix, what = "completion", "cmpl", "this completion"
    stream_response = CompletionStreamResponse

    async def create_completion(self, request: CompletionRequest, auth: Auth) -> CompletionResponse | PrimedStream:
        return await self.generate(request, auth)

    def build_prompts(self, request: CompletionRequest, target: Target) -> tuple[list[list[int]], list[str]]:
        """(token ids, text) per prompt."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt is empty", param="prompt")
        if len(items) * request.n > self.settings.max_prompts:
            raise bad_request(
                f"at most {self.settings.max_prompts} prompts x n per request; split the batch", param="prompt"
            )
        vocab = len(target.model.tokenizer)
        ids, texts = [], []
        for index, item in enumerate(items):
            if isinstance(item, str):
                tokens = target.model.encode(item)
                ids.append(tokens)
                texts.append(item)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise bad_request(
                        f"prompt {index} holds token ids outside the vocabulary (0..{vocab - 1})", param="prompt"
                    )
                ids.append(list(item))
                texts.append(target.model.decode(item))
            if not ids[-1]:
                raise bad_request(f"prompt {index} has no tokens", param="prompt")
        return ids, texts

    def max_new_tokens(self, request: CompletionRequest, target: Target, prompts: list[list[int]]) -> int:
        return request.max_tokens if request.max_tokens is not None else 16

    def response(
        self, job: Generation, texts: list[str], reasons: list[str | None], usage: UsageInfo
    ) -> CompletionResponse:
        n, echo = job.request.n, job.request.echo
        choices = [
            CompletionChoice(index=i, text=(job.texts[i // n] if echo else "") + text, finish_reason=reasons[i])
            for i, text in enumerate(texts)
        ]
        return CompletionResponse(id=job.id, model=job.target.name, choices=choices, usage=usage)

    def prompt_events(self, job: Generation, prompt: int) -> Iterable[str]:
        if job.request.echo:
            n = job.request.n
            for j in range(n):
                yield self.choice_event(job, prompt * n + j, job.texts[prompt], None, True)

    def choice_event(self, job: Generation, index: int, text: str, reason: str | None, first: bool) -> str:
        return sse(
            CompletionStreamResponse(
                id=job.id,
                created=job.created,
                model=job.target.name,
                choices=[CompletionStreamChoice(index=index, text=text, finish_reason=reason)],
            )
        )
