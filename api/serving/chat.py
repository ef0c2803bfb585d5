"""``OpenAIServingChat``: ``POST /v1/chat/completions`` with the model's chat template, whole or streamed."""

from __future__ import annotations

import logging

from nectar.api.errors import bad_request
from nectar.api.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from nectar.api.serving.base import Auth, Target
from nectar.api.serving.generation import Generation, GenerationServing, PrimedStream, sse, templated_sse
from nectar.api.text import TokenTexts

logger = logging.getLogger(__name__)

ROLE_FOR_TEMPLATE = {"developer": "system"}  # newer OpenAI role; chat templates know "system"


class OpenAIServingChat(GenerationServing):
    """Chat completions: the conversation goes through the tokenizer's chat template, the reply is generated."""

    kind, id_prefix, what = "chat", "chatcmpl", "this chat completion"
    stream_response = ChatCompletionStreamResponse

    async def create_chat_completion(
        self, request: ChatCompletionRequest, auth: Auth
    ) -> ChatCompletionResponse | PrimedStream:
        return await self.generate(request, auth)

    def build_prompts(self, request: ChatCompletionRequest, target: Target) -> tuple[list[list[int]], list[str]]:
        if not target.model.has_chat_template:
            raise bad_request(
                f"{target.name} has no chat template; use /v1/completions with a plain prompt",
                param="model",
                code="no_chat_template",
            )
        messages = [{"role": ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": m.text()} for m in request.messages]
        try:
            return [target.model.chat_prompt(messages)], []
        except Exception as e:  # template errors: roles out of order, unsupported roles
            raise bad_request(
                f"The chat template of {target.name} rejected these messages: {e}", param="messages"
            ) from None

    def max_new_tokens(self, request: ChatCompletionRequest, target: Target, prompts: list[list[int]]) -> int:
        max_new = request.requested_max_tokens()
        if max_new is None:  # OpenAI's default is "as much as fits"; a gateway default keeps holds reasonable
            limit = target.model.max_model_len - target.prefix_tokens
            max_new = max(1, min(self.settings.default_max_tokens, limit - len(prompts[0])))
        return max_new

    def response(
        self, job: Generation, texts: list[str], reasons: list[str | None], usage: UsageInfo
    ) -> ChatCompletionResponse:
        choices = []
        for i, text in enumerate(texts):
            logprobs = None
            if job.request.logprobs:
                choice = job.choices.get(i)
                logprobs = self._logprobs(job, choice.scores if choice else [])
            choices.append(
                ChatCompletionChoice(
                    index=i, message=AssistantMessage(content=text), logprobs=logprobs, finish_reason=reasons[i]
                )
            )
        return ChatCompletionResponse(id=job.id, model=job.target.name, choices=choices, usage=usage)

    @staticmethod
    def _logprobs(job: Generation, scores) -> ChoiceLogprobs:
        names = TokenTexts(job.target.model.tokenizer)

        def entry(token: int, logprob: float) -> TopLogprob:
            text = names(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        content = []
        for score, _ in scores:
            chosen = entry(score.token, score.logprob)
            top = [entry(token, logprob) for token, logprob in score.top]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def choice_event(self, job: Generation, index: int, text: str, reason: str | None, first: bool) -> str:
        def chunk_model(delta: DeltaMessage, finish_reason: str | None = None, logprobs=None):
            return ChatCompletionStreamResponse(
                id=job.id,
                created=job.created,
                model=job.target.name,
                choices=[
                    ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
                ],
            )

        def chunk(delta: DeltaMessage, finish_reason: str | None = None, logprobs=None) -> str:
            return sse(chunk_model(delta, finish_reason, logprobs))

        logprobs = None
        if job.request.logprobs:
            choice = job.choices.get(index)
            scores = choice.take_scores() if choice else []
            logprobs = self._logprobs(job, scores) if scores else None
        events = []
        if first:  # every reply starts with a chunk naming the role
            events.append(chunk(DeltaMessage(role="assistant", content="")))
        if logprobs:
            events.append(chunk(DeltaMessage(content=text), logprobs=logprobs))
        elif text:
            events.append(
                templated_sse(job.templates, index, lambda text: chunk_model(DeltaMessage(content=text)), text)
            )
        if reason:
            events.append(chunk(DeltaMessage(), reason))
        return "".join(events)
