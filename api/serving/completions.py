"""``OpenAIServingCompletion``: ``POST /v1/completions``, whole or streamed."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from nectar.api.billing import Charge
from nectar.api.errors import ApiError, bad_request
from nectar.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    random_id,
)
from nectar.api.serving.base import SSE_DONE, Auth, OpenAIServing, PrimedStream, Target, prime, sse

logger = logging.getLogger(__name__)


class OpenAIServingCompletion(OpenAIServing):
    """Text completions over the swarm; each prompt is one swarm session with ``n`` rows."""

    def _prompts(self, request: CompletionRequest, target: Target) -> tuple[list[list[int]], list[str]]:
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
            raise bad_request(f"at most {self.settings.max_prompts} prompts x n per request; split the batch",
                              param="prompt")  # fmt: skip
        vocab = len(target.model.tokenizer)
        ids, texts = [], []
        for index, item in enumerate(items):
            if isinstance(item, str):
                tokens = target.model.encode(item)
                ids.append(tokens)
                texts.append(item)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise bad_request(f"prompt {index} holds token ids outside the vocabulary (0..{vocab - 1})",
                                      param="prompt")  # fmt: skip
                ids.append(list(item))
                texts.append(target.model.decode(item))
            if not ids[-1]:
                raise bad_request(f"prompt {index} has no tokens", param="prompt")
        return ids, texts

    async def create_completion(self, request: CompletionRequest, auth: Auth) -> CompletionResponse | PrimedStream:
        self.check_supported(request)
        target = await self.resolve_model(request.model, auth)
        prompt_ids, prompt_texts = self._prompts(request, target)
        max_new = request.max_tokens if request.max_tokens is not None else 16
        for ids in prompt_ids:
            self.check_length(target, len(ids), max_new)
        params = request.to_generation_params(max_new)
        request_id = random_id("cmpl")
        worst = sum(len(ids) for ids in prompt_ids) + len(prompt_ids) * request.n * max_new
        hold_id = await self.billing.reserve(account_id=auth.account_id, tokens=worst, reference=request_id,
                                             what="this completion")  # fmt: skip
        if request.stream:
            return await prime(self._stream(request, target, prompt_ids, prompt_texts, params, request_id, hold_id,
                                            auth))  # fmt: skip
        charge = Charge(0, 0)
        texts = [""] * (len(prompt_ids) * request.n)
        reasons: list[str | None] = [None] * len(texts)
        try:
            for p, ids in enumerate(prompt_ids):
                async for index, delta, reason in self.run_choices(target, ids, params, first_index=p * request.n,
                                                                   charge=charge):  # fmt: skip
                    texts[index] += delta
                    reasons[index] = reason or reasons[index]
        except BaseException:
            charge = Charge(0, 0)  # nothing was delivered: nothing is charged
            raise
        finally:
            await self.settle(hold_id=hold_id, charge=charge, kind="completion", target=target, auth=auth)
        choices = [
            CompletionChoice(index=i, text=(prompt_texts[i // request.n] if request.echo else "") + text,
                             finish_reason=reasons[i])
            for i, text in enumerate(texts)
        ]  # fmt: skip
        return CompletionResponse(id=request_id, model=target.name, choices=choices, usage=self.usage(charge))

    async def _stream(self, request: CompletionRequest, target: Target, prompt_ids: list[list[int]],
                      prompt_texts: list[str], params, request_id: str, hold_id: int,
                      auth: Auth) -> AsyncIterator[str]:
        created, charge = int(time.time()), Charge(0, 0)

        def chunk(index: int, text: str, reason: str | None = None) -> str:
            return sse(CompletionStreamResponse(id=request_id, created=created, model=target.name, choices=[
                CompletionStreamChoice(index=index, text=text, finish_reason=reason)]))  # fmt: skip

        started = False
        try:
            try:
                for p, ids in enumerate(prompt_ids):
                    if request.echo:
                        for j in range(request.n):
                            started = True
                            yield chunk(p * request.n + j, prompt_texts[p])
                    async for index, delta, reason in self.run_choices(target, ids, params, first_index=p * request.n,
                                                                       charge=charge):  # fmt: skip
                        started = True
                        yield chunk(index, delta, reason)
            except ApiError as error:
                if not started:  # nothing delivered yet: an HTTP error, and no charge
                    charge = Charge(0, 0)
                    raise
                yield self.stream_error(error)
                yield SSE_DONE
                return
            if request.stream_options and request.stream_options.include_usage:
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=target.name, choices=[],
                                                   usage=self.usage(charge)))  # fmt: skip
            yield SSE_DONE
        finally:
            await self.settle(hold_id=hold_id, charge=charge, kind="completion", target=target, auth=auth)
