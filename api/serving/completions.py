"""``OpenAIServingCompletion``: ``POST /v1/completions``, whole or streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nectar.api.errors import bad_request
from nectar.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from nectar.api.serving.base import Auth, Target
from nectar.api.serving.generation import Generation, GenerationServing, PrimedStream, sse, templated_sse
from nectar.api.text import TokenTexts

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
        names = TokenTexts(job.target.model.tokenizer)
        choices = []
        for i, text in enumerate(texts):
            logprobs = None
            if job.request.logprobs is not None:
                logprobs = self._prompt_logprobs(job, i // n, names) if echo else CompletionLogprobs()
                choice = job.choices.get(i)
                base = len(job.texts[i // n]) if echo else 0
                self._add(logprobs, choice.scores if choice else [], base, names)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=(job.texts[i // n] if echo else "") + text,
                    logprobs=logprobs,
                    finish_reason=reasons[i],
                )
            )
        return CompletionResponse(id=job.id, model=job.target.name, choices=choices, usage=usage)

    def _prompt_logprobs(self, job: Generation, prompt: int, names: TokenTexts) -> CompletionLogprobs:
        """The echoed prompt's entries: its first token has no logprob (nothing precedes it)."""
        ids = job.prompts[prompt]
        scores = job.prompt_scores.get(prompt) or []
        logprobs = CompletionLogprobs(tokens=[names(token) for token in ids], text_offset=names.prefix_offsets(ids))
        logprobs.token_logprobs.append(None)
        logprobs.top_logprobs.append(None)
        for score in scores:
            logprobs.token_logprobs.append(score.logprob)
            logprobs.top_logprobs.append(self._top(score, names))
        return logprobs

    @staticmethod
    def _top(score, names: TokenTexts) -> dict[str, float]:
        """The likeliest tokens and the chosen one (as vLLM: the chosen token is always listed)."""
        top = {names(token): logprob for token, logprob in score.top}
        top.setdefault(names(score.token), score.logprob)
        return top

    def _add(self, logprobs: CompletionLogprobs, scores, base: int, names: TokenTexts) -> CompletionLogprobs:
        for score, offset in scores:
            logprobs.tokens.append(names(score.token))
            logprobs.token_logprobs.append(score.logprob)
            logprobs.top_logprobs.append(self._top(score, names))
            logprobs.text_offset.append(base + offset)
        return logprobs

    def prompt_events(self, job: Generation, prompt: int) -> Iterable[str]:
        if job.request.echo:
            n = job.request.n
            names = TokenTexts(job.target.model.tokenizer)
            for j in range(n):
                logprobs = self._prompt_logprobs(job, prompt, names) if job.request.logprobs is not None else None
                yield self._event(job, prompt * n + j, job.texts[prompt], None, logprobs)

    def choice_event(self, job: Generation, index: int, text: str, reason: str | None, first: bool) -> str:
        logprobs = None
        if job.request.logprobs is not None:
            choice = job.choices.get(index)
            base = len(job.texts[index // job.request.n]) if job.request.echo else 0
            names = TokenTexts(job.target.model.tokenizer)
            logprobs = self._add(CompletionLogprobs(), choice.take_scores() if choice else [], base, names)
        return self._event(job, index, text, reason, logprobs)

    def _event(self, job: Generation, index: int, text: str, reason: str | None, logprobs) -> str:
        def build(text: str) -> CompletionStreamResponse:
            return CompletionStreamResponse(
                id=job.id,
                created=job.created,
                model=job.target.name,
                choices=[CompletionStreamChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)],
            )

        if logprobs is not None:
            return sse(build(text))
        return templated_sse(job.templates, (index, reason), build, text)
