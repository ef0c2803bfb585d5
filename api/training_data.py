"""Fine-tuning files: JSONL parsing and tokenization, shared by the API (validation at job creation) and the worker.

Each line is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}`` whose last
message is the assistant's reply. Only completion / reply tokens are learned (prompt positions get label -100), and
each example ends with the end-of-text token so the tuned model learns to stop.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TrainingFileError(ValueError):
    """The file cannot be trained on; the message names the line and what to fix."""


@dataclass
class Example:
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict] | None = None


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def parse_jsonl(content: bytes, *, max_examples: int) -> list[Example]:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingFileError(f"the file is not UTF-8 ({e})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise TrainingFileError(f"line {number} is not JSON ({e})") from None
        if not isinstance(item, dict):
            raise TrainingFileError(f"line {number} must be a JSON object")
        if "messages" in item:
            messages = item["messages"]
            if (
                not isinstance(messages, list)
                or len(messages) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            ):
                raise TrainingFileError(f"line {number}: 'messages' must list at least two {{role, content}} objects")
            if messages[-1].get("role") != "assistant":
                raise TrainingFileError(f"line {number}: the last message must be the assistant's reply to learn")
            examples.append(Example(messages=[{"role": m.get("role"), "content": m["content"]} for m in messages]))
        elif isinstance(item.get("prompt"), str) and isinstance(item.get("completion"), str):
            if not item["completion"]:
                raise TrainingFileError(f"line {number}: 'completion' is empty")
            examples.append(Example(prompt=item["prompt"], completion=item["completion"]))
        else:
            raise TrainingFileError(f"line {number} needs 'prompt' and 'completion' strings or a 'messages' list")
        if len(examples) > max_examples:
            raise TrainingFileError(f"more than {max_examples} examples; split the file")
    if not examples:
        raise TrainingFileError("the file holds no examples (one JSON object per line)")
    return examples


def tokenize(
    examples: list[Example], tokenizer, *, eos_token_id: int | None, max_length: int
) -> list[TokenizedExample]:
    """Token ids and labels per example; raises TrainingFileError for one longer than ``max_length``."""
    out = []
    for index, example in enumerate(examples):
        if example.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise TrainingFileError("this model has no chat template: use {prompt, completion} examples")
            text = tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True, tokenize=False)
            prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            answer = example.messages[-1]["content"]
        else:
            prompt = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
            answer = example.completion
        completion = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if eos_token_id is not None:
            completion.append(eos_token_id)
        ids = prompt + completion
        if len(ids) > max_length:
            raise TrainingFileError(
                f"example {index + 1} has {len(ids)} tokens, above the {max_length} this model "
                f"takes with its soft prompt; shorten it"
            )
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * len(prompt) + completion))
    return out


@dataclass
class TrainingPlan:
    """Resolved hyperparameters and the worst-case token count the job is held for."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    pre_seq_len: int
    tuning_mode: str
    steps_per_epoch: int
    total_steps: int
    max_tokens: int  # swarm tokens at most: every step at the longest example, with the soft prompt

    def to_json(self) -> dict:
        return {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
            "pre_seq_len": self.pre_seq_len,
            "tuning_mode": self.tuning_mode,
        }


def plan(
    examples: list[TokenizedExample],
    *,
    n_epochs: int,
    batch_size: int,
    learning_rate_multiplier: float,
    pre_seq_len: int,
    tuning_mode: str,
    max_steps: int,
) -> TrainingPlan:
    batch_size = max(1, min(batch_size, len(examples)))
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * n_epochs
    if total > max_steps:
        raise TrainingFileError(
            f"{n_epochs} epochs of {len(examples)} examples at batch size {batch_size} is "
            f"{total} steps, above this gateway's {max_steps}; use fewer epochs or examples"
        )
    longest = max(len(e.input_ids) for e in examples)
    return TrainingPlan(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=learning_rate_multiplier,
        pre_seq_len=pre_seq_len,
        tuning_mode=tuning_mode,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        max_tokens=total * batch_size * (longest + pre_seq_len),
    )
