"""``OpenAIServing``: what the serving classes share: the context built at startup, the caller, model-name and
context-length checks. The metered generation flow of completions and chat is ``generation.py``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
from sqlalchemy import Engine as DbEngine

from nectar.api import crud
from nectar.api.billing import Billing
from nectar.api.core.config import Settings
from nectar.api.engine import Engine, PromptSet, SwarmModel
from nectar.api.errors import bad_request, not_found, unavailable
from nectar.service.db import session_scope
from nectar.wire.protocol import ADAPTER_NAME

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
    adapter: str | None = None  # a LoRA adapter nodes serve (the model ``<base>:<adapter>``)

    @property
    def prefix_tokens(self) -> int:
        return self.prompts.pre_seq_len if self.prompts else 0


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
        base_name, _, adapter = name.rpartition(":")
        base = self.swarm.get(base_name) if base_name else None
        if base is not None and ADAPTER_NAME.match(adapter):  # a name, never a path: nodes look it up
            if adapter in await anyio.to_thread.run_sync(base.adapters):
                return Target(name, base, adapter=adapter)
            raise not_found(
                f"No node serves adapter {adapter!r} of {base_name} on every block now "
                f"(served: {', '.join(await anyio.to_thread.run_sync(base.adapters)) or 'none'}); GET /v1/models "
                "lists the adapters as <model>:<adapter>",
                param="model",
                code="model_not_found",
            )

        def lookup():
            with session_scope(self.context.db) as session:
                row = crud.get_tuned_model(session, name=name)
                if row is None or row.account_id != auth.account_id:
                    return None
                return row.base_model, PromptSet(row.name, row.tuning_mode, row.pre_seq_len, row.prompts)

        found = await anyio.to_thread.run_sync(lookup)
        if found is None:
            raise not_found(
                f"The model {name!r} does not exist or is not yours. Available: "
                f"{', '.join(self.swarm.models) or 'none'} (GET /v1/models lists yours too)",
                param="model",
                code="model_not_found",
            )
        base_name, prompts = found
        base = self.swarm.get(base_name)
        if base is None:
            raise unavailable(
                f"{name} is tuned on {base_name}, which this gateway does not serve now", code="model_not_served"
            )
        return Target(name, base, prompts)

    def check_length(self, target: Target, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = target.model.max_model_len - target.prefix_tokens
        if prompt_tokens + max_new_tokens > limit:
            raise bad_request(
                f"This model's context is {limit} tokens; the prompt has {prompt_tokens} tokens and "
                f"max_tokens asks for {max_new_tokens} more. Shorten the prompt or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    @staticmethod
    def check_supported(request) -> None:
        problem = request.sampling_problem()  # a 400, not the retryable 503 a NaN in the sampler gave (issue 24)
        if problem is not None:
            raise bad_request(problem[1], param=problem[0], code="invalid_sampling_parameter")
        problem = request.unsupported()
        if problem is not None:
            raise bad_request(problem[1], param=problem[0], code="unsupported_parameter")
