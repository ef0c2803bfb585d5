"""``PromptTuner``: the training loop of a fine-tuning job (prompt tuning through the swarm, run by the worker).

Batches are padded on the right (a causal model never looks ahead, and padded positions carry label -100), so one
forward/backward per step goes through the swarm; only the soft prompts get gradients and Adam updates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nectar.api.training_data import IGNORE_INDEX, TokenizedExample, TrainingPlan

logger = logging.getLogger(__name__)


@dataclass
class StepReport:
    step: int
    total_steps: int
    epoch: int
    loss: float
    trained_tokens: int  # swarm tokens so far (what the job is charged for)
    seconds: float


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    loss: float | None
    stopped: bool  # on_step asked to stop (a cancellation)


class PromptTuner:
    """:param model: a DistributedModelForCausalLM built with tuning_mode and pre_seq_len of the plan
    :param examples: tokenized examples
    :param plan: resolved hyperparameters
    :param learning_rate: Adam learning rate (already multiplied)
    :param pad_token_id: id used to pad batches (never learned)
    :param seed: example order"""

    def __init__(
        self,
        model,
        examples: list[TokenizedExample],
        plan: TrainingPlan,
        *,
        learning_rate: float,
        pad_token_id: int,
        seed: int,
    ):
        self.model, self.examples, self.plan = model, examples, plan
        self.pad_token_id, self.seed = pad_token_id, seed
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable prompts: build it with tuning_mode and pre_seq_len")
        self.optimizer = torch.optim.Adam(params, lr=learning_rate)

    def _batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in indices]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids)
            labels[i, : len(row.labels)] = torch.tensor(row.labels)
        return ids, labels

    def run(self, on_step: Callable[[StepReport], bool]) -> TrainResult:
        """Trains the whole plan; ``on_step`` gets a report after each step and returns False to stop early."""
        generator = torch.Generator().manual_seed(self.seed)
        step, tokens, loss_value = 0, 0, None
        self.model.train()
        for epoch in range(self.plan.n_epochs):
            order = torch.randperm(len(self.examples), generator=generator).tolist()
            for start in range(0, len(order), self.plan.batch_size):
                began = time.perf_counter()
                ids, labels = self._batch(order[start : start + self.plan.batch_size])
                loss, _ = self.model(ids, labels=labels)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += ids.shape[0] * (ids.shape[1] + self.plan.pre_seq_len)
                loss_value = float(loss.detach())
                report = StepReport(
                    step=step,
                    total_steps=self.plan.total_steps,
                    epoch=epoch + 1,
                    loss=loss_value,
                    trained_tokens=tokens,
                    seconds=time.perf_counter() - began,
                )
                if not on_step(report):
                    return TrainResult(step, tokens, loss_value, stopped=True)
        self.model.eval()
        return TrainResult(step, tokens, loss_value, stopped=False)
