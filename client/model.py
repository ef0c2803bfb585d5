"""``DistributedModelForCausalLM``: embeddings, final norm and LM head run locally, every block runs in the swarm."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GenerationConfig

from nectar.client.config import ClientConfig
from nectar.client.generation import (
    GenerationStep,
    Logprobs,
    PromptLogprobs,
    SamplingParams,
    StopStringMatcher,
    choose_next_tokens,
)
from nectar.client.inference_session import InferenceSession
from nectar.client.payments import Wallet
from nectar.client.pricing import BudgetExceededError, CostMeter, Quote, route_price
from nectar.client.remote_sequential import RemoteCaller, RemoteSequential
from nectar.client.routing import PeerScorer, RemoteSequenceManager
from nectar.models import get_family, load_client_head, load_config, model_id_of, resolve_model
from nectar.models.prequant import checkpoint_quantization
from nectar.wire.dht import ClientRuntime
from nectar.wire.peers import initial_peers as resolve_peers

logger = logging.getLogger(__name__)

TUNING_MODES = (None, "ptune", "deep_ptune")


def stored_weights_only(config: ClientConfig, stored: str | None, model_id: str) -> ClientConfig:
    """For a pre-quantized model (``stored``: its weights' mode), routes use only nodes announcing that mode: no
    honest node serves those weights in another (``nectar.models.prequant``). ValueError if ``config.quant`` excludes
    it."""
    if stored is None:
        return config
    allowed = {q for q in config.quant.replace(" ", "").split(",") if q}
    if allowed and stored not in allowed:
        raise ValueError(
            f"{model_id} stores {stored} weights (a pre-quantized checkpoint), which --quant {config.quant} excludes: "
            f"allow {stored}"
        )
    return replace(config, quant=stored)


class DistributedModelForCausalLM(torch.nn.Module):
    """A causal LM whose transformer blocks are served by the swarm. Build it with ``from_pretrained``.

    Trainable parts for prompt tuning: ``prompt_embeddings`` (a soft prefix of ``pre_seq_len`` tokens) and, in
    ``deep_ptune`` mode, ``intermediate_prompt_embeddings`` (a prefix added before every block).
    """

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        *,
        config: ClientConfig,
        runtime: ClientRuntime,
        wallet: Wallet,
        scorer: PeerScorer | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        dtype: torch.dtype = torch.float32,
        active_adapter: str | None = None,
        head_device: str | torch.device = "cpu",
    ):
        super().__init__()
        if tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {tuning_mode!r}")
        if tuning_mode and pre_seq_len <= 0:
            raise ValueError("prompt tuning needs pre_seq_len > 0")
        self.config = load_config(model_path)
        config = stored_weights_only(config, checkpoint_quantization(self.config), model_id)
        self.model_path, self.model_id, self.client_config = Path(model_path), model_id, config
        self.num_blocks = get_family(self.config).num_blocks(self.config)
        self.runtime, self.wallet = runtime, wallet
        self.head = load_client_head(model_path, dtype=dtype, device=head_device)
        self.head.requires_grad_(False)
        self.sequence_manager = RemoteSequenceManager(
            runtime, model_id, self.num_blocks, config=config, scorer=scorer, active_adapter=active_adapter
        )
        self.transformer = RemoteSequential(RemoteCaller(self.sequence_manager, runtime, wallet, config))
        self.tuning_mode, self.pre_seq_len = tuning_mode, pre_seq_len if tuning_mode else 0
        hidden = self.head.embedding_dim
        if tuning_mode:
            # start from real token embeddings: a prefix on the embedding manifold trains faster than noise
            token_ids = torch.randint(
                0, self.head.vocab_size, (pre_seq_len,), generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad():
                initial = self.head.embed(token_ids[None])[0].float().clone()
            self.prompt_embeddings = torch.nn.Parameter(initial)
        if tuning_mode == "deep_ptune":
            self.intermediate_prompt_embeddings = torch.nn.Parameter(torch.zeros(self.num_blocks, pre_seq_len, hidden))
        try:
            self.generation_config = GenerationConfig.from_pretrained(model_path)
        except Exception:
            self.generation_config = GenerationConfig()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "smollm2-135m",
        *,
        initial_peers: Sequence[str] | None = None,
        config: ClientConfig | None = None,
        private_key: str | None = None,
        scorer: PeerScorer | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        dtype: torch.dtype = torch.float32,
        domain: dict | None = None,
        active_adapter: str | None = None,
        head_device: str | torch.device = "cpu",
    ) -> DistributedModelForCausalLM:
        """:param model: built-in name (``nectar models``), a local Hugging Face checkpoint directory, or a Hub id
          (``org/name[@revision]``; only the embeddings' and head's shards are fetched)
        :param initial_peers: multiaddrs of swarm peers (a list, or one string separated by commas and/or spaces);
          defaults to ``config.initial_peers`` or NECTAR_INITIAL_PEERS
        :param private_key: Ethereum key that signs vouchers (default: ``config.private_key`` or a throwaway key)
        :param domain: EIP-712 domain of the vouchers (default: that of the deployment file, ``nectar.deployment``)
        :param active_adapter: a LoRA adapter's name as nodes announce it (``nectar swarm``); every block is computed
          with it, by nodes that serve it only
        :param head_device: where the embeddings and LM head compute (e.g. ``cuda`` on a GPU host: each token reads
          the whole head, which bounds a CPU client serving many sessions); the sampler stays on the CPU

        A failure releases everything this call started (the DHT process, the reputation scorer's thread)."""
        config = config or ClientConfig()
        peers = resolve_peers(initial_peers or config.initial_peers, env=os.environ)
        config = replace(config, initial_peers=tuple(peers))
        path = resolve_model(str(model))
        if domain is None:
            from nectar.deployment import domain_from_deployment

            domain = domain_from_deployment()
        wallet = Wallet(private_key or config.private_key, domain=domain, voucher_interval=config.voucher_interval)
        started = []  # what this call started, released again if it fails
        if config.ledger_url and config.countersign:
            from nectar.wire.ledger_api import LedgerPaymentPolicy

            # bounded: past 100k receipts queued while the ledger is down, the oldest go
            wallet.ledger = LedgerPaymentPolicy(config.ledger_url, flush_interval=1.0, max_queue=100_000)
            started.append(lambda: wallet.ledger.shutdown(timeout=5.0))
        if config.require_stake and not config.ledger_url:
            raise ValueError(
                "require_stake needs ledger_url: the stake gate learns stakes from the ledger the client pays "
                "through (pass --ledger-url, or --no-require-stake for a private swarm)"
            )
        try:
            if scorer is None and config.ledger_url:
                from nectar.client.routing.reputation import ReputationScorer

                scorer = ReputationScorer.from_config(config)  # reputation and price from the ledger steer routes
                started.append(scorer.close)
            runtime = ClientRuntime(peers)
            started.append(runtime.shutdown)
            return cls(
                path,
                model_id_of(str(model)),
                config=config,
                runtime=runtime,
                wallet=wallet,
                scorer=scorer,
                tuning_mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                dtype=dtype,
                active_adapter=active_adapter,
                head_device=head_device,
            )
        except BaseException:
            for release in reversed(started):
                try:
                    release()
                except Exception:
                    logger.warning("Could not release what a failed from_pretrained started", exc_info=True)
            raise

    # ---- prompts ----------------------------------------------------------------------------------------------

    def _prefix(self, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input prefix [B, P, H], per-block prompts [n_blocks, B, P, H]) for the current tuning mode."""
        if not self.tuning_mode:
            return None, None
        prefix = self.prompt_embeddings.unsqueeze(0).expand(batch_size, -1, -1)
        deep = None
        if self.tuning_mode == "deep_ptune":
            deep = self.intermediate_prompt_embeddings.unsqueeze(1).expand(-1, batch_size, -1, -1)
        return prefix, deep

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu() for name, p in self.named_parameters() if p.requires_grad}

    def save_prompts(self, path: str | os.PathLike) -> None:
        torch.save(
            {
                "tuning_mode": self.tuning_mode,
                "pre_seq_len": self.pre_seq_len,
                "model": self.model_id,
                "state": self.trainable_state(),
            },
            path,
        )

    def load_prompts(self, path: str | os.PathLike) -> None:
        data = torch.load(path, map_location="cpu")
        if (data["tuning_mode"], data["pre_seq_len"]) != (self.tuning_mode, self.pre_seq_len):
            raise ValueError(
                f"{path} holds {data['tuning_mode']} prompts of length {data['pre_seq_len']}; build the "
                f"model with tuning_mode={data['tuning_mode']!r}, pre_seq_len={data['pre_seq_len']}"
            )
        with torch.no_grad():
            for name, value in data["state"].items():
                getattr(self, name).copy_(value)

    # ---- training path ----------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns (loss or None, logits [B, T, vocab]); differentiable w.r.t. the prompts."""
        embeds = self.head.embed(input_ids)
        prefix, deep = self._prefix(input_ids.shape[0])
        if prefix is not None:
            embeds = torch.cat([prefix.to(embeds.device, embeds.dtype), embeds], dim=1)
        hidden = self.transformer(embeds, deep)
        logits = self.head.logits(hidden[:, self.pre_seq_len :])
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return loss, logits

    # ---- generation -------------------------------------------------------------------------------------------

    def inference_session(
        self, *, max_length: int, batch_size: int = 1, meter: CostMeter | None = None
    ) -> InferenceSession:
        """Opens a session with server-side caches for ``max_length`` tokens (prompt tuning prefix included);
        ``meter`` counts its cost and bounds it (``nectar.client.pricing``)."""
        return InferenceSession(
            self.sequence_manager,
            self.runtime,
            self.wallet,
            max_length=max_length,
            batch_size=batch_size,
            config=self.client_config,
            meter=meter,
        )

    def quote(self, *, max_price: int | None = None) -> Quote:
        """The price per token (credit wei through every block) of the route a session would take now; with
        ``max_price``, of the fastest route within it (``RouteTooExpensiveError`` if none is). Blocking: it may read
        the DHT and ping nodes."""
        route = self.sequence_manager.make_inference_route(max_price=max_price)
        return Quote(tuple(route), route_price(route))

    def _sampling_params(
        self,
        *,
        max_new_tokens,
        max_length,
        prompt_length,
        do_sample,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        eos_token_id,
        pad_token_id,
        stop_strings,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias=None,
    ) -> SamplingParams:
        g = self.generation_config
        if max_new_tokens is None:
            max_new_tokens = (
                (max_length - prompt_length)
                if max_length is not None
                else (g.max_new_tokens or max(0, (g.max_length or 20) - prompt_length))
            )
        eos = eos_token_id if eos_token_id is not None else g.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=bool(g.do_sample if do_sample is None else do_sample),
            temperature=temperature if temperature is not None else (g.temperature or 1.0),
            top_k=top_k if top_k is not None else (g.top_k if do_sample is None else None),
            top_p=top_p if top_p is not None else (g.top_p if do_sample is None else None),
            repetition_penalty=repetition_penalty if repetition_penalty is not None else g.repetition_penalty,
            eos_token_ids=eos_ids,
            pad_token_id=pad_token_id
            if pad_token_id is not None
            else (g.pad_token_id or (eos_ids[0] if eos_ids else 0)),
            stop_strings=[stop_strings] if isinstance(stop_strings, str) else list(stop_strings or []),
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in logit_bias.items()} if logit_bias else None,
            prompt_length=prompt_length,
        )
        params.validate()
        return params

    def stream_generate(self, input_ids: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        """Yields the next token ids [B] one step at a time (finished rows repeat ``pad_token_id``); takes the
        arguments of ``stream_generate_steps`` except the logprob ones."""
        steps = self.stream_generate_steps(input_ids, **kwargs)
        try:
            for step in steps:
                yield step.tokens
        finally:
            steps.close()  # closes the session at once, not when the generator is collected

    def stream_generate_steps(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings=None,
        tokenizer=None,
        eos_token_id=None,
        pad_token_id=None,
        seed: int | None = None,
        session: InferenceSession | None = None,
        meter: CostMeter | None = None,
        max_cost_wei: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        json_schema: dict | bool | None = None,
    ) -> Iterator[GenerationStep | PromptLogprobs]:
        """Yields a ``GenerationStep`` per generated token (the next token of every row, finished rows repeating
        ``pad_token_id``), after a ``PromptLogprobs`` first if ``prompt_logprobs`` is set.

        :param meter: counts what the nodes' receipts charge and bounds it (``max_cost_wei``: a meter of its own):
            the generation stops early, as at ``max_new_tokens``, before a step that would take it past the budget (a
            prompt the budget cannot pay for raises ``BudgetExceededError``), and takes no route dearer per token than
            the budget spread over the session's tokens
        :param presence_penalty: OpenAI's, over generated tokens, in [-2, 2]
        :param frequency_penalty: OpenAI's, over generated tokens, in [-2, 2]
        :param logit_bias: token id -> bias in [-100, 100] added to its logit
        :param logprobs: with each step, the chosen tokens' logprobs and the ``logprobs`` likeliest (at most 20)
        :param prompt_logprobs: the prompt tokens' logprobs and as many likeliest tokens, even with no new token
        :param json_schema: every row is a JSON document valid under this schema (needs ``tokenizer``)

        Logprobs are those of the raw model distribution (before bias, penalties, mask and temperature)."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise ValueError("Padded batches are not supported: pass prompts of equal length (or one at a time)")
        batch_size, prompt_length = input_ids.shape
        params = self._sampling_params(
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            prompt_length=prompt_length,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            stop_strings=stop_strings,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
        )
        if params.max_new_tokens == 0 and prompt_logprobs is None:
            return
        processors = params.processors(self.head.vocab_size)
        mask = None
        if json_schema is not None:
            from nectar.client.constrained import GrammarMask, json_schema_grammar

            if tokenizer is None:
                raise ValueError("json_schema needs a tokenizer: pass tokenizer=...")
            eos = params.eos_token_ids[0] if params.eos_token_ids else tokenizer.eos_token_id
            grammar = json_schema_grammar(tokenizer, json_schema)
            mask = GrammarMask(tokenizer, grammar, batch_size=batch_size, eos_token_id=eos)
        # the largest logit alone decides: no logits needed
        greedy = not params.do_sample and not processors and mask is None and logprobs is None
        stops = bool(params.eos_token_ids or params.stop_strings)
        eos_ids = torch.tensor(params.eos_token_ids)
        stop_matcher = StopStringMatcher(tokenizer, params.stop_strings, prompt_length)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        own_session = session is None
        if meter is None and max_cost_wei is not None:
            meter = CostMeter(max_cost_wei)
        if own_session:
            session = self.inference_session(
                max_length=self.pre_seq_len + prompt_length + params.max_new_tokens, batch_size=batch_size, meter=meter
            )
        try:
            with torch.no_grad():
                sequences = input_ids
                # what sampling and stop checks read; greedy decoding without them only counts (a copy less a token)
                keep_sequences, generated = not greedy or stops, 0
                unfinished = torch.ones(batch_size, dtype=torch.bool)
                embeds = self.head.embed(input_ids)
                prefix, deep = self._prefix(batch_size)
                skip = 0
                if prefix is not None and session.position == 0:
                    embeds = torch.cat([prefix.to(embeds.device, embeds.dtype), embeds], dim=1)
                    skip = prefix.shape[1]
                hidden = session.step(embeds, prompts=deep if session.position == 0 else None)
                if prompt_logprobs is not None:
                    yield PromptLogprobs(self._prompt_logprobs(hidden[:, skip:], input_ids, prompt_logprobs))
                for _ in range(params.max_new_tokens):
                    step_logprobs = None
                    if greedy:
                        next_tokens = self.head.greedy_tokens(hidden[:, -1:]).cpu()
                    else:
                        logits = self.head.logits(hidden[:, -1:])[:, -1].float().cpu()
                        scores = mask.apply(logits, unfinished) if mask is not None else logits
                        next_tokens = choose_next_tokens(scores, sequences, params, processors, generator)
                        if logprobs is not None:
                            step_logprobs = Logprobs.of(logits[:, None], next_tokens[:, None], logprobs)
                        if mask is not None:
                            mask.advance(next_tokens, unfinished)
                    if stops:
                        padding = torch.full_like(next_tokens, params.pad_token_id)
                        next_tokens = torch.where(unfinished, next_tokens, padding)
                    generated += 1
                    if keep_sequences:
                        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                    yield GenerationStep(next_tokens, step_logprobs)
                    if stops:  # each small op costs a step tens of microseconds: none where nothing can stop a row
                        if params.eos_token_ids:
                            unfinished &= ~torch.isin(next_tokens, eos_ids)
                        unfinished &= ~stop_matcher(sequences)
                        if not unfinished.any():
                            return
                    if generated >= params.max_new_tokens:
                        return
                    try:
                        hidden = session.step(self.head.embed(next_tokens[:, None]))
                    except BudgetExceededError as e:  # what was generated is kept: the rows end as at max_new_tokens
                        logger.info(f"Generation stopped at its budget: {e}")
                        return
        finally:
            if own_session:
                session.close()

    PROMPT_LOGPROB_CHUNK = 64  # positions per LM-head pass: [chunk, vocab] floats at a time, not [prompt, vocab]

    def _prompt_logprobs(self, hidden: torch.Tensor, input_ids: torch.Tensor, top: int) -> Logprobs:
        """Logprobs of tokens 1.. of each row from the hidden states of positions 0..T-2 (rows with the same
        prompt, as the ``n`` rows of one request, are scored once)."""
        rows = []
        for row in range(input_ids.shape[0]):
            if row and torch.equal(input_ids[row], input_ids[0]):
                rows.append(rows[0])
                continue
            parts = []
            for start in range(0, input_ids.shape[1] - 1, self.PROMPT_LOGPROB_CHUNK):
                end = min(start + self.PROMPT_LOGPROB_CHUNK, input_ids.shape[1] - 1)
                logits = self.head.logits(hidden[row : row + 1, start:end]).float().cpu()
                parts.append(Logprobs.of(logits, input_ids[row : row + 1, start + 1 : end + 1], top))
            rows.append(parts)
        k = min(top, 20)
        empty = Logprobs(
            torch.zeros(1, 0, dtype=torch.long),
            torch.zeros(1, 0),
            torch.zeros(1, 0, k, dtype=torch.long),
            torch.zeros(1, 0, k),
        )

        def joined(parts: list[Logprobs]) -> Logprobs:
            parts = parts or [empty]
            return Logprobs(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in Logprobs.__dataclass_fields__))

        whole = [joined(parts) for parts in rows]
        return Logprobs(*(torch.cat([getattr(w, f) for w in whole]) for f in Logprobs.__dataclass_fields__))

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor:
        """Like ``transformers``' ``generate()``: returns prompt + new tokens [B, T + new].

        Supports max_new_tokens/max_length, do_sample, temperature, top_k, top_p, repetition_penalty,
        presence_penalty, frequency_penalty, logit_bias, json_schema (with tokenizer=...),
        stop_strings (with tokenizer=...), eos_token_id, pad_token_id, seed, a ``streamer`` with put()/end()
        (e.g. ``transformers.TextStreamer``) and an open ``session`` to continue a conversation."""
        if input_ids is None:
            raise ValueError("generate() needs input_ids (tokenize your prompt first)")
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        sequences = input_ids
        for next_tokens in self.stream_generate(input_ids, attention_mask=attention_mask, **kwargs):
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
        if streamer is not None:
            streamer.end()
        return sequences

    def shutdown(self) -> None:
        self.runtime.shutdown()
        if self.wallet.ledger is not None:  # post the countersigned receipts still queued
            self.wallet.ledger.shutdown(timeout=5.0)
