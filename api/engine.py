"""The gateway's side of the swarm: one ``DistributedModelForCausalLM`` per served model, shared by all requests.

Generation is synchronous, so each runs in a worker thread (``max_concurrent_generations`` of them per model: 8, the
nodes' default cap of sessions per client) with its own swarm session, and hands token ids back to the event loop in
batches: a step waits in a queue, and the loop is woken once for all the steps it has not taken yet (fewer wake-ups,
and fewer, larger SSE events, when the loop is behind). Sessions of concurrent requests reach the nodes together,
which batch their steps into one forward per round; past the workers, at most ``max_queued_generations`` requests
wait, and further ones are refused at once (``Overloaded``: 503 + Retry-After) rather than queue without bound. Every
variant of a model (its fine-tuned soft prompts) shares the base model's swarm runtime and wallet, so the gateway has
one DHT peer and one voucher channel per node, and pays every node from its own escrow.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from nectar.api.errors import ApiError
from nectar.api.protocol import GenerationParams
from nectar.client import ClientConfig, CostMeter, DistributedModelForCausalLM
from nectar.client.generation import PromptLogprobs
from nectar.wire.announce import ServerState

logger = logging.getLogger(__name__)

RECENT_RECEIPTS = 10_000  # checked receipts the gateway's wallet keeps in memory


@dataclass(frozen=True)
class PromptSet:
    """Trained soft prompts to generate with (a fine-tuned model)."""

    name: str
    tuning_mode: str
    pre_seq_len: int
    prompts: bytes  # what DistributedModelForCausalLM.save_prompts wrote


@dataclass
class TokenScore:
    """A token's logprob under the model's raw distribution and the likeliest tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), likeliest first


@dataclass
class SwarmStep:
    """What ``SwarmModel.stream`` yields: the next token of each row (and their scores if logprobs were asked), or
    once, first, the scores of the prompt's tokens after the first (``prompt``, rows share the prompt)."""

    tokens: list[int]
    scores: list[TokenScore] | None = None
    prompt: list[TokenScore] | None = None


def _scores(logprobs, row: int) -> list[TokenScore]:
    """One row of the client's ``Logprobs`` as TokenScores."""
    tokens, values = logprobs.token_ids[row].tolist(), logprobs.logprobs[row].tolist()
    top_ids, top_values = logprobs.top_ids[row].tolist(), logprobs.top_logprobs[row].tolist()
    return [
        TokenScore(token, value, list(zip(ids, tops, strict=True)))
        for token, value, ids, tops in zip(tokens, values, top_ids, top_values, strict=True)
    ]


class Handoff:
    """Items from worker threads to the event loop, in batches: ``put`` from any thread, ``await take()`` on the loop
    for every item put since the last take. The loop is woken once per batch, not once per item."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: collections.deque = collections.deque()
        self.woken = asyncio.Event()
        self.waking = False  # a wake-up is on its way to the loop: further items just join ``pending``
        self.wakeups = 0  # how many the loop got (for tests and profiles)

    def put(self, item) -> None:
        with self.lock:
            self.pending.append(item)
            if self.waking:
                return
            self.waking = True
            self.wakeups += 1
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.woken.set)
            except RuntimeError:  # the loop closed meanwhile: nobody waits for these items
                pass

    async def take(self) -> list:
        """Every item put since the last take (at least one), oldest first."""
        while True:
            await self.woken.wait()
            with self.lock:
                self.woken.clear()
                items = list(self.pending)
                self.pending.clear()
                self.waking = False
            if items:  # empty: a wake-up whose items an earlier take already got
                return items


class GenerationCancelled(Exception):
    """The request went away before its generation started."""


class Overloaded(ApiError):
    """Every generation worker is busy and the queue is full: retry after ``retry_after`` seconds (503)."""

    def __init__(self, model: str, running: int, queued: int, retry_after: int):
        super().__init__(
            503,
            f"{model} is serving {running} generations with {queued} more waiting, its limit; retry in "
            f"{retry_after}s (the Retry-After header), or ask the operator to raise NECTAR_API_MAX_QUEUED_GENERATIONS",
            code="server_overloaded",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


class SwarmModel:
    """One served base model: its client, tokenizer and generation workers. Built once at startup.

    :param name_or_path: built-in model name or checkpoint folder
    :param initial_peers: multiaddrs of the swarm
    :param private_key: the gateway's wallet key (vouchers to nodes are signed with it)
    :param client_config: timeouts and retries of the swarm client
    :param max_concurrent: generations running at once, each its own swarm session (the nodes batch them)
    :param max_queued: requests waiting for a worker beyond those; past that, ``Overloaded``
    :param tuned_cache_size: fine-tuned prompt sets kept loaded
    :param domain: EIP-712 domain of the gateway's vouchers (default: the deployment file's)
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        initial_peers: Sequence[str],
        private_key: str | None,
        client_config: ClientConfig,
        max_concurrent: int = 8,
        max_queued: int = 64,
        tuned_cache_size: int = 4,
        head_device: str = "cpu",
        scorer=None,
        domain: dict | None = None,
    ):
        from nectar.models import load_config, load_tokenizer, model_id_of, resolve_model

        self.path = resolve_model(name_or_path)
        self.name = model_id_of(name_or_path)
        self.tokenizer = load_tokenizer(self.path)
        config = load_config(self.path)
        self.max_model_len = int(getattr(config, "max_position_embeddings", 2048))
        self.model = DistributedModelForCausalLM.from_pretrained(
            name_or_path,
            initial_peers=list(initial_peers),
            private_key=private_key,
            config=client_config,
            scorer=scorer,
            domain=domain,
            head_device=head_device,
        )
        # the gateway pays from the wallet's totals and meters each request on its own: the list of checked receipts
        # needs only a recent window, not every receipt of a process that runs for months
        self.model.wallet.keep_receipts = RECENT_RECEIPTS
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix=f"gen-{self.name[:12]}")
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self._admitted = 0  # generations running or waiting for a worker (event loop only)
        self._mean_lock = threading.Lock()
        self._mean_seconds = 1.0  # a generation's mean duration (moving average): sizes Retry-After
        self._stops: set[threading.Event] = set()  # of the generations in flight, for shutdown
        self._tuned: OrderedDict[tuple, DistributedModelForCausalLM] = OrderedDict()
        self._tuned_lock = threading.Lock()
        self._tuned_cache_size = tuned_cache_size
        logger.info(
            f"Serving {self.name} ({self.path}), context {self.max_model_len} tokens, wallet "
            f"{self.model.wallet.address}"
        )

    # ---- tokens ------------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The chat template applied to ``messages`` with the assistant's turn opened, as token ids."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- variants ----------------------------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        """The LoRA adapters the swarm serves on every block of this model now (nodes announce them); each is served
        as the model ``<name>:<adapter>``. Blocking (it may read the DHT): call it off the event loop."""
        manager = self.model.sequence_manager
        covered: dict[str, set[int]] = {}
        for block, servers in manager.servers().items():
            for info in servers.values():
                if info.state == ServerState.ONLINE:
                    for adapter in info.adapters:
                        covered.setdefault(adapter, set()).add(block)
        return sorted(name for name, blocks in covered.items() if len(blocks) == manager.num_blocks)

    def variant(self, prompts: PromptSet | None, adapter: str | None = None) -> DistributedModelForCausalLM:
        """The base model, or a copy with trained soft prompts and/or a LoRA adapter (routes only to nodes that serve
        it) that shares its runtime, wallet and client head."""
        if prompts is None and adapter is None:
            return self.model
        key = (
            (prompts.name, prompts.tuning_mode, prompts.pre_seq_len, hash(prompts.prompts)) if prompts else None,
            adapter,
        )
        with self._tuned_lock:
            if key in self._tuned:
                self._tuned.move_to_end(key)
                return self._tuned[key]
        base = self.model
        tuned = DistributedModelForCausalLM(
            base.model_path,
            base.model_id,
            config=base.client_config,
            runtime=base.runtime,
            wallet=base.wallet,
            tuning_mode=prompts.tuning_mode if prompts else None,
            pre_seq_len=prompts.pre_seq_len if prompts else 0,
            scorer=base.sequence_manager.scorer,
            active_adapter=adapter,
            head_device=base.head.device,
        )
        if prompts is not None:
            tuned.load_prompts(io.BytesIO(prompts.prompts))
        tuned.requires_grad_(False)
        with self._tuned_lock:
            self._tuned[key] = tuned
            while len(self._tuned) > self._tuned_cache_size:
                self._tuned.popitem(last=False)
        return tuned

    # ---- pricing -----------------------------------------------------------------------------------------------

    def quote(self, prompts: PromptSet | None = None, adapter: str | None = None, *, max_price: int | None = None):
        """The route a generation of this variant would take now and its price per token (``nectar.client.Quote``);
        ``RouteTooExpensiveError`` if every route costs more than ``max_price``. Blocking: call it off the loop."""
        return self.variant(prompts, adapter).quote(max_price=max_price)

    # ---- generation --------------------------------------------------------------------------------------------

    async def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        prompts: PromptSet | None = None,
        adapter: str | None = None,
        meter: CostMeter | None = None,
    ) -> AsyncIterator[list[SwarmStep]]:
        """Yields the generation's steps in order, in batches: every step generated since the event loop last took
        some (one step each when it keeps up). A step has the next token id of each of the ``params.n`` rows; the
        prompt's scores come first if ``params.prompt_logprobs`` is set.

        Raises ``Overloaded`` at once if every worker is busy and the queue is full. Closing the iterator (the client
        went away, or every choice finished) stops the generation after the current step, closes its swarm session and
        frees its worker; a request still queued never starts."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop)
        put = handoff.put
        stop = threading.Event()

        def work() -> None:
            began, whole = time.monotonic(), False
            try:
                if stop.is_set():
                    raise GenerationCancelled()
                model = self.variant(prompts, adapter)
                input_ids = torch.tensor([prompt_ids] * params.n, dtype=torch.long)
                constrained = params.json_schema is not None
                steps = model.stream_generate_steps(
                    input_ids,
                    max_new_tokens=params.max_new_tokens,
                    do_sample=params.do_sample,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    repetition_penalty=params.repetition_penalty,
                    stop_strings=params.stop or None,
                    tokenizer=self.tokenizer if params.stop or constrained else None,
                    seed=params.seed,
                    eos_token_id=self.eos_token_ids or None,
                    meter=meter,  # counts what the nodes charge, within the request's budget
                    presence_penalty=params.presence_penalty,
                    frequency_penalty=params.frequency_penalty,
                    logit_bias=params.logit_bias,
                    logprobs=params.logprobs,
                    prompt_logprobs=params.prompt_logprobs,
                    json_schema=params.json_schema,
                )
                try:
                    for step in steps:
                        if isinstance(step, PromptLogprobs):
                            put(("tokens", SwarmStep([], prompt=_scores(step.logprobs, 0))))
                            continue
                        tokens = step.tokens.tolist()
                        scores = None
                        if step.logprobs is not None:
                            scores = [_scores(step.logprobs, row)[0] for row in range(len(tokens))]
                        put(("tokens", SwarmStep(tokens, scores)))
                        if stop.is_set():
                            break
                    else:
                        whole = True
                finally:
                    steps.close()  # closes the inference session at every node
                put(("done", None))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                put(("error", e))
            if whole:  # whole generations only: a cancelled one says nothing of the duration
                with self._mean_lock:
                    self._mean_seconds += 0.2 * (time.monotonic() - began - self._mean_seconds)

        self._admitted += 1
        self._stops.add(stop)
        try:
            self._executor.submit(work)
            while True:
                items = await handoff.take()
                steps = [value for kind, value in items if kind == "tokens"]
                if steps:
                    yield steps
                for kind, value in items:
                    if kind == "done":
                        return
                    if kind == "error":
                        raise value
        finally:
            stop.set()  # the worker stops after its current step (or never starts): the client went away or is done
            self._stops.discard(stop)
            self._admitted -= 1

    def check_capacity(self) -> None:
        """Raises ``Overloaded`` if a new generation would find every worker busy and the queue full."""
        if self._admitted < self.max_concurrent + self.max_queued:
            return
        queued = max(0, self._admitted - self.max_concurrent)
        # the queue ahead drains max_concurrent at a time, each a mean generation long
        wait = self._mean_seconds * (queued // self.max_concurrent + 1)
        raise Overloaded(self.name, min(self._admitted, self.max_concurrent), queued, max(1, min(60, math.ceil(wait))))

    def shutdown(self) -> None:
        for stop in list(self._stops):  # generations in flight stop after their step, so their threads end
            stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.model.shutdown()


class Engine:
    """Every served model by name. ``get(name)`` or None."""

    def __init__(self, models: Sequence[SwarmModel], *, scorer=None):
        self.models = {m.name: m for m in models}
        self.scorer = scorer

    @classmethod
    def start(
        cls,
        names: Sequence[str],
        *,
        initial_peers: Sequence[str],
        private_key: str | None,
        step_timeout: float = 30.0,
        max_concurrent: int = 8,
        max_queued: int = 64,
        tuned_cache_size: int = 4,
        head_device: str = "cpu",
        ledger_url: str | None = None,
        domain: dict | None = None,
    ) -> Engine:
        """Joins the swarm for every model; with a ledger, routes prefer reputable, cheap nodes."""
        if not initial_peers:
            raise ValueError(
                "No swarm to serve from: pass --initial-peers MULTIADDR (printed by `nectar dht` or "
                "`nectar node`) or set NECTAR_INITIAL_PEERS / NECTAR_API_INITIAL_PEERS"
            )
        config = ClientConfig(
            initial_peers=tuple(initial_peers),
            step_timeout=step_timeout,
            connect_timeout=min(10.0, step_timeout),
            private_key=private_key,
            ledger_url=ledger_url,  # the gateway countersigns the receipts it accepts and posts them (its nodes' work)
        )
        scorer = make_scorer(ledger_url)
        built: list[SwarmModel] = []
        try:
            for name in names:
                built.append(
                    SwarmModel(
                        name,
                        initial_peers=initial_peers,
                        private_key=private_key,
                        client_config=config,
                        max_concurrent=max_concurrent,
                        max_queued=max_queued,
                        tuned_cache_size=tuned_cache_size,
                        head_device=head_device,
                        scorer=scorer,
                        domain=domain,
                    )
                )
        except BaseException:
            for model in built:
                model.shutdown()
            if scorer is not None:
                scorer.close()
            raise
        return cls(built, scorer=scorer)

    def get(self, name: str) -> SwarmModel | None:
        return self.models.get(name)

    @property
    def wallet_address(self) -> str | None:
        for model in self.models.values():
            return model.model.wallet.address
        return None

    def shutdown(self) -> None:
        for model in self.models.values():
            try:
                model.shutdown()
            except Exception:  # keep shutting the others down
                logger.warning(f"Could not shut {model.name} down cleanly", exc_info=True)
        if self.scorer is not None:
            self.scorer.close()


def make_scorer(ledger_url: str | None):
    """The client's reputation-and-price route scorer over the ledger, or None (speed alone) without a ledger."""
    if not ledger_url:
        return None
    try:
        from nectar.client.routing.reputation import ReputationScorer
    except ImportError:  # an older client without the scorer: route by speed
        logger.warning("This client has no ReputationScorer; routing by speed alone")
        return None
    return ReputationScorer(ledger_url, refresh_period=30.0, require_stake=True)  # the gateway pays: stake gate on
