"""``GenerationServing``: the metered generation flow completions and chat share. It quotes the route and holds the
worst case on the account, runs every prompt's ``n`` choices on the swarm within that budget, and settles what the
nodes' receipts cost plus the operator's margin (``nectar.api.pricing``), whole or streamed (SSE). Subclasses only
build the prompts and format the answers."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from pydantic_core import to_json

from nectar.api.billing import Charge
from nectar.api.core.config import micro_to_credits
from nectar.api.errors import ApiError, bad_request, from_client_error
from nectar.api.pricing import Hold, Pricing
from nectar.api.protocol import ErrorInfo, ErrorResponse, GenerationParams, UsageInfo, random_id
from nectar.api.serving.base import Auth, OpenAIServing, Target
from nectar.api.text import ChoiceText
from nectar.client import CostMeter, RouteTooExpensiveError

logger = logging.getLogger(__name__)


def sse(payload) -> str:
    """One server-sent event holding a JSON payload (a Pydantic model or a dict)."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"

TEXT_MARK = "\x00nectar:text\x00"  # stands for the text in a chunk template


def templated_sse(templates: dict, key, build, text: str) -> str:
    """``sse(build(text))`` without building and dumping a model per token: ``build(TEXT_MARK)`` is dumped once per
    ``key`` (cached in ``templates``) and each event splices ``text`` in, JSON-encoded as Pydantic encodes it."""
    parts = templates.get(key)
    if parts is None:
        parts = templates[key] = build(TEXT_MARK).model_dump_json().split(to_json(TEXT_MARK).decode())
    if len(parts) != 2:  # the mark is also elsewhere (say, in a model name): no template
        return sse(build(text))
    return f"data: {parts[0]}{to_json(text).decode()}{parts[1]}\n\n"


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


@dataclass
class Generation:
    """One request being served: what it asked for and the hold that pays for it."""

    request: Any  # CompletionRequest or ChatCompletionRequest
    target: Target
    prompts: list[list[int]]  # token ids; each prompt runs request.n choices, numbered prompt * n + row
    texts: list[str]  # the prompts as text, where the answer echoes them (completions); else empty
    params: GenerationParams
    id: str
    hold_id: int
    auth: Auth
    created: int = field(default_factory=lambda: int(time.time()))
    hold: Hold | None = None  # the quote the hold was sized from
    meter: CostMeter | None = None  # what the nodes' receipts cost, within the hold's budget
    cost: int | None = None  # micro-credits charged, once priced
    choices: dict[int, ChoiceText] = field(default_factory=dict)  # by choice index, as they start
    prompt_scores: dict[int, list] = field(default_factory=dict)  # by prompt: its tokens' TokenScores (echo)
    templates: dict = field(default_factory=dict)  # streamed chunks' templates (templated_sse)


class GenerationServing(OpenAIServing):
    """Reserve, run, settle: a request is charged ``usage.total_tokens`` of what was delivered, and nothing if it
    failed before delivering anything."""

    kind: ClassVar[str]  # the usage record's kind
    id_prefix: ClassVar[str]  # of the response id
    what: ClassVar[str]  # names the request in an insufficient-credit error
    stream_response: ClassVar[type]  # the chunk model, for the final usage chunk

    # ---- what subclasses provide --------------------------------------------------------------------------------

    def build_prompts(self, request, target: Target) -> tuple[list[list[int]], list[str]]:
        """(token ids per prompt, their texts if the answer needs them); raises ApiError for a bad request."""
        raise NotImplementedError

    def max_new_tokens(self, request, target: Target, prompts: list[list[int]]) -> int:
        raise NotImplementedError

    def response(self, job: Generation, texts: list[str], reasons: list[str | None], usage: UsageInfo):
        """The whole answer, from each choice's text and finish reason."""
        raise NotImplementedError

    def prompt_events(self, job: Generation, prompt: int) -> Iterable[str]:
        """SSE events sent before a prompt's choices are generated (completions' echo)."""
        return ()

    def choice_event(self, job: Generation, index: int, text: str, reason: str | None, first: bool) -> str:
        """The SSE event(s) of new text of choice ``index`` (``first``: its first event)."""
        raise NotImplementedError

    # ---- the flow -----------------------------------------------------------------------------------------------

    async def generate(self, request, auth: Auth):
        """A response, or a PrimedStream of SSE events if ``request.stream``."""
        self.check_supported(request)
        target = await self.resolve_model(request.model, auth)
        prompts, texts = self.build_prompts(request, target)
        max_new = self.max_new_tokens(request, target, prompts)
        for ids in prompts:
            self.check_length(target, len(ids), max_new)
        params = request.to_generation_params(max_new)
        await self.check_options(params, target)
        target.model.check_capacity()  # refuse (503 + Retry-After) before any hold when every slot is taken
        request_id = random_id(self.id_prefix)
        runs = max_new > 0 or params.prompt_logprobs is not None  # scoring a prompt runs its prefill
        hold = await self.quote(target, prompts, request.n, max_new, runs=runs)
        reserving = asyncio.ensure_future(
            self.billing.reserve_amount(
                account_id=auth.account_id,
                amount=hold.amount,
                reference=request_id,
                what=self.what,
                detail=hold.describe(),
            )
        )
        try:
            hold_id = await asyncio.shield(reserving)
        except asyncio.CancelledError:  # the client left while the hold was being placed: free it once it is
            reserving.add_done_callback(lambda done: self._release(done, target.name, auth.key_id))
            raise
        meter = CostMeter(hold.budget_wei, max_price=self.pricing.max_route_price)
        job = Generation(request, target, prompts, texts, params, request_id, hold_id, auth, hold=hold, meter=meter)
        if request.stream:
            return await prime(self._stream(job))
        return await self._whole(job)

    async def check_options(self, params: GenerationParams, target: Target) -> None:
        """400 for a logit_bias token outside the model's vocabulary or a JSON schema the sampler cannot enforce,
        before anything is held or run."""
        vocab = target.model.model.head.vocab_size
        for token in params.logit_bias or {}:
            if token >= vocab:
                raise bad_request(
                    f"logit_bias names token {token}, outside the vocabulary of {target.name} (0..{vocab - 1})",
                    param="logit_bias",
                )
        if params.json_schema is not None:
            from nectar.client.constrained import ConstraintError, json_schema_grammar

            try:  # compiling can take a while for a large schema: off the event loop
                await asyncio.to_thread(json_schema_grammar, target.model.tokenizer, params.json_schema)
            except ConstraintError as e:
                raise bad_request(f"{e}; fix response_format.json_schema.schema", param="response_format") from None

    def _release(self, reserving: asyncio.Future, model: str, key_id: int | None) -> None:
        """Settles for nothing a hold placed after its request was cancelled (else it waits for the sweep)."""
        if reserving.cancelled() or reserving.exception() is not None:
            return
        settling = self.billing.settle(
            hold_id=reserving.result(), charge=Charge(0, 0), kind=self.kind, model=model, key_id=key_id, cost=0
        )
        asyncio.ensure_future(settling).add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _whole(self, job: Generation):
        charge = Charge(0, 0)
        texts = [""] * (len(job.prompts) * job.request.n)
        reasons: list[str | None] = [None] * len(texts)
        try:
            async for index, delta, reason in self._choices(job, charge):
                texts[index] += delta
                reasons[index] = reason or reasons[index]
        except asyncio.CancelledError:  # the client went away (cancel_on_disconnect): the work done is charged
            raise
        except BaseException:
            charge = Charge(0, 0)  # nothing was delivered: nothing is charged
            raise
        finally:
            await self.settle(job, charge)
        return self.response(job, texts, reasons, self.usage(charge, job))

    async def _stream(self, job: Generation) -> AsyncIterator[str]:
        charge, opened = Charge(0, 0), set()
        started = False
        try:
            try:
                for p, ids in enumerate(job.prompts):
                    echoed = False
                    async for index, text, reason in self._run(job, p, ids, charge):
                        if not echoed:  # after the swarm's first answer, which brings the prompt's logprobs
                            echoed = True
                            for event in self.prompt_events(job, p):
                                started = True
                                yield event
                        first = index not in opened
                        opened.add(index)
                        started = True
                        yield self.choice_event(job, index, text, reason, first)
            except ApiError as error:
                if not started:  # nothing delivered yet: an HTTP error, and no charge
                    charge = Charge(0, 0)
                    raise
                yield self.stream_error(error)
                yield SSE_DONE
                return
            options = job.request.stream_options
            if options and options.include_usage:
                await self.price(job, charge)  # the usage chunk shows the cost the settlement charges
                yield sse(
                    self.stream_response(
                        id=job.id, created=job.created, model=job.target.name, choices=[], usage=self.usage(charge, job)
                    )
                )
            yield SSE_DONE
        finally:
            await self.settle(job, charge)

    async def _choices(self, job: Generation, charge: Charge) -> AsyncIterator[tuple[int, str, str | None]]:
        for p, ids in enumerate(job.prompts):
            async for item in self._run(job, p, ids, charge):
                yield item

    def _run(self, job: Generation, prompt: int, ids: list[int], charge: Charge):
        job.prompt_scores[prompt] = []
        return self.run_choices(
            job.target,
            ids,
            job.params,
            first_index=prompt * job.request.n,
            charge=charge,
            meter=job.meter,
            choices_out=job.choices,
            prompt_scores_out=job.prompt_scores[prompt],
        )

    async def run_choices(
        self,
        target: Target,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        first_index: int,
        charge: Charge,
        meter: CostMeter | None = None,
        choices_out: dict[int, ChoiceText] | None = None,
        prompt_scores_out: list | None = None,
    ) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yields (choice index, new text, finish reason or None) as the swarm generates (a choice's text of every
        step the event loop takes at once in one item: fewer, larger events when it is behind), counting tokens into
        ``charge``: the prompt once, every generated token of a choice until it finishes. The choices (with their
        tokens' scores) go into ``choices_out`` and the prompt's scores into ``prompt_scores_out``."""
        choices = [
            ChoiceText(target.model.tokenizer, stops=params.stop, eos_token_ids=target.model.eos_token_ids)
            for _ in range(params.n)
        ]
        if choices_out is not None:
            choices_out.update({first_index + row: choice for row, choice in enumerate(choices)})
        charge.prompt_tokens += len(prompt_ids)
        if params.max_new_tokens > 0 or params.prompt_logprobs is not None:  # the prompt's scores need its prefill
            steps = target.model.stream(prompt_ids, params, prompts=target.prompts, adapter=target.adapter, meter=meter)
            try:
                async for batch in steps:
                    news: dict[int, str] = {}  # by row: its text from every step of the batch, one event each
                    for step in batch:
                        if step.prompt is not None:
                            if prompt_scores_out is not None:
                                prompt_scores_out.extend(step.prompt)
                            continue
                        for row, token in enumerate(step.tokens):
                            choice = choices[row]
                            if choice.finished:
                                continue
                            charge.completion_tokens += 1
                            delta = choice.add(token, step.scores[row] if step.scores else None)
                            if delta or choice.finished:
                                news[row] = news.get(row, "") + delta
                    for row, text in news.items():
                        yield first_index + row, text, choices[row].finish_reason
                    if all(choice.finished for choice in choices):
                        break
            except ApiError:
                raise
            except Exception as e:
                logger.warning(f"Generation on {target.name} failed: {type(e).__name__}: {e}")
                raise from_client_error(e) from e
            finally:
                await steps.aclose()
        for row, choice in enumerate(choices):
            if not choice.finished:
                yield first_index + row, choice.finish("length"), "length"

    def usage(self, charge: Charge, job: Generation | None = None) -> UsageInfo:
        cost = job.cost if job is not None and job.cost is not None else self.billing.cost(charge.total_tokens)
        return UsageInfo(
            prompt_tokens=charge.prompt_tokens,
            completion_tokens=charge.completion_tokens,
            total_tokens=charge.total_tokens,
            cost=micro_to_credits(cost),
        )

    # ---- pricing ------------------------------------------------------------------------------------------------

    @functools.cached_property
    def pricing(self) -> Pricing:
        return Pricing.from_settings(self.settings)

    async def quote(self, target: Target, prompts: list[list[int]], n: int, max_new: int, *, runs: bool) -> Hold:
        """The hold for a request, from the price of the route it would take now (503 if every route costs more
        than the operator's cap): every row computes the soft prompt, the prompt and ``max_new`` positions."""
        pricing = self.pricing
        billed_tokens = sum(len(ids) for ids in prompts) + len(prompts) * n * max_new
        if not runs:  # nothing runs on the swarm (the prompt is only echoed, unscored): no route to price
            return pricing.hold(route_price=0, node_tokens=0, billed_tokens=billed_tokens)
        quote_route = functools.partial(
            target.model.quote, target.prompts, target.adapter, max_price=pricing.max_route_price
        )
        try:
            quote = await anyio.to_thread.run_sync(quote_route)
        except RouteTooExpensiveError as e:
            raise ApiError(
                503,
                f"No route for {target.name} within this gateway's price cap, so nothing was charged: {e}",
                code="route_too_expensive",
            ) from e
        except Exception as e:
            raise from_client_error(e) from e
        node_tokens = sum(n * (target.prefix_tokens + len(ids) + max_new) for ids in prompts)
        return pricing.hold(route_price=quote.price, node_tokens=node_tokens, billed_tokens=billed_tokens)

    async def price(self, job: Generation, charge: Charge) -> int:
        """What the request is charged (micro-credits): the receipts its sessions accepted, with the margin, once
        every session closed (the meter is sealed then: no later work is paid for); nothing if nothing was
        delivered."""
        if job.cost is None:
            timeout = 2 * self.settings.step_timeout + 40  # a session's close waits at most this for last receipts
            receipts = await anyio.to_thread.run_sync(job.meter.settle, timeout)
            if charge.total_tokens == 0:
                job.cost = 0
            else:
                job.cost = self.pricing.charge(receipts_wei=receipts, billed_tokens=charge.total_tokens, hold=job.hold)
            logger.debug(f"{job.id}: nodes charged {receipts} wei in {job.meter.receipts} receipts; cost {job.cost}")
        return job.cost

    @staticmethod
    def stream_error(error: ApiError) -> str:
        """The SSE event that reports a failure after the stream has started (HTTP status is already sent)."""
        return sse(ErrorResponse(error=ErrorInfo(**error.body.error.model_dump())))

    async def settle(self, job: Generation, charge: Charge) -> None:
        # shielded as a whole: a client that goes away cancels the request task, but its charge must still land
        await asyncio.shield(self._settle(job, charge))

    async def _settle(self, job: Generation, charge: Charge) -> None:
        try:
            await self.billing.settle(
                hold_id=job.hold_id,
                charge=charge,
                kind=self.kind,
                model=job.target.name,
                key_id=job.auth.key_id,
                cost=await self.price(job, charge),
            )
        except Exception:  # the hold stays; the stale-hold sweeper returns it, and the log tells the operator
            logger.exception(f"Could not settle hold {job.hold_id} ({charge})")
