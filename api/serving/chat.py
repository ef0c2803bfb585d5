"""``OpenAIServingChat``: ``POST /v1/chat/completions`` with the model's chat template, whole or streamed."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from nectar.api.billing import Charge
from nectar.api.errors import ApiError, bad_request
from nectar.api.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    random_id,
)
from nectar.api.serving.base import SSE_DONE, Auth, OpenAIServing, PrimedStream, Target, prime, sse

logger = logging.getLogger(__name__)

ROLE_FOR_TEMPLATE = {"developer": "system"}  # newer OpenAI role; chat templates know "system"


class OpenAIServingChat(OpenAIServing):
    """Chat completions: the conversation goes through the tokenizer's chat template, the reply is generated."""

    def _prompt_ids(self, request: ChatCompletionRequest, target: Target) -> list[int]:
        if not target.model.has_chat_template:
            raise bad_request(f"{target.name} has no chat template; use /v1/completions with a plain prompt",
                              param="model", code="no_chat_template")  # fmt: skip
        messages = [{"role": ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": m.text()} for m in request.messages]
        try:
            return target.model.chat_prompt(messages)
        except Exception as e:  # template errors: roles out of order, unsupported roles
            raise bad_request(f"The chat template of {target.name} rejected these messages: {e}",
                              param="messages") from None  # fmt: skip

    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     auth: Auth) -> ChatCompletionResponse | PrimedStream:
        self.check_supported(request)
        target = await self.resolve_model(request.model, auth)
        prompt_ids = self._prompt_ids(request, target)
        limit = target.model.max_model_len - target.prefix_tokens
        max_new = request.requested_max_tokens()
        if max_new is None:  # OpenAI's default is "as much as fits"; a gateway default keeps holds reasonable
            max_new = max(1, min(self.settings.default_max_tokens, limit - len(prompt_ids)))
        self.check_length(target, len(prompt_ids), max_new)
        params = request.to_generation_params(max_new)
        request_id = random_id("chatcmpl")
        hold_id = await self.billing.reserve(account_id=auth.account_id, tokens=len(prompt_ids) + request.n * max_new,
                                             reference=request_id, what="this chat completion")  # fmt: skip
        if request.stream:
            return await prime(self._stream(request, target, prompt_ids, params, request_id, hold_id, auth))
        charge = Charge(0, 0)
        texts, reasons = [""] * request.n, [None] * request.n
        try:
            async for index, delta, reason in self.run_choices(target, prompt_ids, params, first_index=0,
                                                               charge=charge):  # fmt: skip
                texts[index] += delta
                reasons[index] = reason or reasons[index]
        except BaseException:
            charge = Charge(0, 0)  # nothing was delivered: nothing is charged
            raise
        finally:
            await self.settle(hold_id=hold_id, charge=charge, kind="chat", target=target, auth=auth)
        choices = [ChatCompletionChoice(index=i, message=AssistantMessage(content=text), finish_reason=reasons[i])
                   for i, text in enumerate(texts)]  # fmt: skip
        return ChatCompletionResponse(id=request_id, model=target.name, choices=choices, usage=self.usage(charge))

    async def _stream(self, request: ChatCompletionRequest, target: Target, prompt_ids: list[int], params,
                      request_id: str, hold_id: int, auth: Auth) -> AsyncIterator[str]:
        created, charge = int(time.time()), Charge(0, 0)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunk(index: int, delta: DeltaMessage, reason: str | None = None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=target.name, choices=[
                ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=reason)]))  # fmt: skip

        opened: set[int] = set()
        try:
            try:
                async for index, text, reason in self.run_choices(target, prompt_ids, params, first_index=0,
                                                                  charge=charge):  # fmt: skip
                    events = []
                    if index not in opened:  # every reply starts with a chunk naming the role
                        opened.add(index)
                        events.append(chunk(index, DeltaMessage(role="assistant", content="")))
                    if text:
                        events.append(chunk(index, DeltaMessage(content=text)))
                    if reason:
                        events.append(chunk(index, DeltaMessage(), reason))
                    yield "".join(events)
            except ApiError as error:
                if not opened:  # nothing delivered yet: an HTTP error, and no charge
                    charge = Charge(0, 0)
                    raise
                yield self.stream_error(error)
                yield SSE_DONE
                return
            if include_usage:
                yield sse(ChatCompletionStreamResponse(id=request_id, created=created, model=target.name, choices=[],
                                                       usage=self.usage(charge)))  # fmt: skip
            yield SSE_DONE
        finally:
            await self.settle(hold_id=hold_id, charge=charge, kind="chat", target=target, auth=auth)
