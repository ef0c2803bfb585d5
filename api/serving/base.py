"""``OpenAIServing``: what completions and chat share: model-name checks, context-length checks, the metered
generation loop (hold, swarm stream, choice text, settlement) and the error builders."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from sqlalchemy import Engine as DbEngine

from nectar.api import crud
from nectar.api.billing import Billing, Charge
from nectar.api.core.config import Settings, micro_to_credits
from nectar.service.db import session_scope
from nectar.api.engine import Engine, PromptSet, SwarmModel
from nectar.api.errors import ApiError, bad_request, not_found, unavailable
from nectar.api.protocol import ErrorInfo, ErrorResponse, GenerationParams, UsageInfo
from nectar.api.text import ChoiceText

logger = logging.getLogger(__name__)


@dataclass
class Auth:
    """The caller: an account and the key it used."""

    account_id: int
    key_id: int | None = None


@dataclass
class ServingContext:
    """What every serving class needs; built once at startup."""

    settings: Settings
    db: DbEngine
    swarm: Engine
    billing: Billing


@dataclass
class Target:
    """The model a request names: its swarm model, and the soft prompts if it is a fine-tuned one."""

    name: str
    model: SwarmModel
    prompts: PromptSet | None = None

    @property
    def prefix_tokens(self) -> int:
        return self.prompts.pre_seq_len if self.prompts else 0


def sse(payload) -> str:
    """One server-sent event holding a JSON payload (a Pydantic model or a dict)."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class PrimedStream:
    """An SSE body whose first event has already been produced, so errors before it became HTTP errors and the
    generator's cleanup (the settlement) is armed before the response starts."""

    def __init__(self, first: str, rest: AsyncIterator[str]):
        self.first, self.rest = first, rest

    async def __aiter__(self):
        try:
            yield self.first
            async for item in self.rest:
                yield item
        finally:
            await self.rest.aclose()


async def prime(stream: AsyncIterator[str]) -> PrimedStream:
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = SSE_DONE
    return PrimedStream(first, stream)


class OpenAIServing:
    """Base of the completion and chat serving classes."""

    def __init__(self, context: ServingContext):
        self.context = context
        self.settings, self.swarm, self.billing = context.settings, context.swarm, context.billing

    # ---- models ------------------------------------------------------------------------------------------------

    async def resolve_model(self, name: str, auth: Auth) -> Target:
        model = self.swarm.get(name)
        if model is not None:
            return Target(name, model)

        def lookup():
            with session_scope(self.context.db) as session:
                row = crud.get_tuned_model(session, name=name)
                if row is None or row.account_id != auth.account_id:
                    return None
                return row.base_model, PromptSet(row.name, row.tuning_mode, row.pre_seq_len, row.prompts)

        found = await anyio.to_thread.run_sync(lookup)
        if found is None:
            raise not_found(f"The model {name!r} does not exist or is not yours. Available: "
                            f"{', '.join(self.swarm.models) or 'none'} (GET /v1/models lists yours too)",
                            param="model", code="model_not_found")  # fmt: skip
        base_name, prompts = found
        base = self.swarm.get(base_name)
        if base is None:
            raise unavailable(f"{name} is tuned on {base_name}, which this gateway does not serve now",
                              code="model_not_served")  # fmt: skip
        return Target(name, base, prompts)

    def check_length(self, target: Target, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = target.model.max_model_len - target.prefix_tokens
        if prompt_tokens + max_new_tokens > limit:
            raise bad_request(f"This model's context is {limit} tokens; the prompt has {prompt_tokens} tokens and "
                              f"max_tokens asks for {max_new_tokens} more. Shorten the prompt or lower max_tokens.",
                              param="max_tokens", code="context_length_exceeded")  # fmt: skip

    @staticmethod
    def check_supported(request) -> None:
        problem = request.unsupported()
        if problem is not None:
            raise bad_request(problem[1], param=problem[0], code="unsupported_parameter")

    def usage(self, charge: Charge) -> UsageInfo:
        return UsageInfo(prompt_tokens=charge.prompt_tokens, completion_tokens=charge.completion_tokens,
                         total_tokens=charge.total_tokens,
                         cost=micro_to_credits(self.billing.cost(charge.total_tokens)))  # fmt: skip

    # ---- generation --------------------------------------------------------------------------------------------

    async def run_choices(self, target: Target, prompt_ids: list[int], params: GenerationParams, *, first_index: int,
                          charge: Charge) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yields (choice index, new text, finish reason or None) as the swarm generates, counting tokens into
        ``charge``: the prompt once, every generated token of a choice until it finishes."""
        choices = [ChoiceText(target.model.tokenizer, stops=params.stop, eos_token_ids=target.model.eos_token_ids)
                   for _ in range(params.n)]  # fmt: skip
        charge.prompt_tokens += len(prompt_ids)
        if params.max_new_tokens > 0:
            steps = target.model.stream(prompt_ids, params, prompts=target.prompts)
            try:
                async for step in steps:
                    for row, token in enumerate(step):
                        choice = choices[row]
                        if choice.finished:
                            continue
                        charge.completion_tokens += 1
                        delta = choice.add(token)
                        if delta or choice.finished:
                            yield first_index + row, delta, choice.finish_reason
                    if all(choice.finished for choice in choices):
                        break
            except ApiError:
                raise
            except Exception as e:
                logger.warning(f"Generation on {target.name} failed: {type(e).__name__}: {e}")
                raise unavailable(f"The swarm could not finish this generation ({type(e).__name__}: {e}). "
                                  f"Retry shortly; only tokens already delivered are charged.") from e
            finally:
                await steps.aclose()
        for row, choice in enumerate(choices):
            if not choice.finished:
                yield first_index + row, choice.finish("length"), "length"

    @staticmethod
    def stream_error(error: ApiError) -> str:
        """The SSE event that reports a failure after the stream has started (HTTP status is already sent)."""
        return sse(ErrorResponse(error=ErrorInfo(**error.body.error.model_dump())))

    async def settle(self, *, hold_id: int, charge: Charge, kind: str, target: Target, auth: Auth) -> None:
        try:
            await self.billing.settle(hold_id=hold_id, charge=charge, kind=kind, model=target.name,
                                      key_id=auth.key_id)  # fmt: skip
        except Exception:  # the hold stays; the stale-hold sweeper returns it, and the log tells the operator
            logger.exception(f"Could not settle hold {hold_id} ({charge})")
