"""``OpenAIServingModels``: ``GET /v1/models`` (swarm models and the caller's fine-tuned ones) and deletion of a
fine-tuned model."""

from __future__ import annotations

import logging

import anyio

from nectar.api import crud
from nectar.api.errors import not_found
from nectar.api.protocol import ModelCard, ModelDeleted, ModelList
from nectar.api.serving.base import Auth, OpenAIServing
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)


class OpenAIServingModels(OpenAIServing):
    def _tuned(self, auth: Auth):
        def work():
            with session_scope(self.context.db) as session:
                return [
                    (t.name, t.base_model, t.pre_seq_len, int(t.created_at.timestamp()))
                    for t in crud.list_tuned_models(session, account_id=auth.account_id)
                ]

        return anyio.to_thread.run_sync(work)

    async def list_models(self, auth: Auth) -> ModelList:
        cards = [ModelCard(id=name, max_model_len=model.max_model_len) for name, model in self.swarm.models.items()]
        for name, model in self.swarm.models.items():  # LoRA adapters the swarm serves, each as a model
            for adapter in await anyio.to_thread.run_sync(model.adapters):
                cards.append(ModelCard(id=f"{name}:{adapter}", root=name, max_model_len=model.max_model_len))
        for name, base, prefix, created in await self._tuned(auth):
            base_model = self.swarm.get(base)
            cards.append(
                ModelCard(
                    id=name,
                    created=created,
                    owned_by=f"acct-{auth.account_id}",
                    root=base,
                    max_model_len=base_model.max_model_len - prefix if base_model else None,
                )
            )
        return ModelList(data=cards)

    async def get_model(self, name: str, auth: Auth) -> ModelCard:
        for card in (await self.list_models(auth)).data:
            if card.id == name:
                return card
        raise not_found(f"The model {name!r} does not exist or is not yours", param="model", code="model_not_found")

    async def delete_model(self, name: str, auth: Auth) -> ModelDeleted:
        def work():
            with session_scope(self.context.db) as session:
                return crud.delete_tuned_model(session, account_id=auth.account_id, name=name)

        if not await anyio.to_thread.run_sync(work):
            raise not_found(
                f"No fine-tuned model {name!r} of yours (swarm models cannot be deleted)",
                param="model",
                code="model_not_found",
            )
        return ModelDeleted(id=name, deleted=True)
