"""OpenAI wire schemas (requests, responses, stream chunks, errors) as Pydantic models.

Every model derives from ``OpenAIBaseModel``, which accepts fields it does not know (clients send newer or vendor
fields) and counts them (``UNKNOWN_FIELDS``, one log line per model and field name at most), so a silently ignored
option shows up without letting one request write thousands of log lines. Every number is bounded (the aliases
below): no input reaches torch, a 64-bit column or the nodes unchecked, and NaN/infinity are refused. Requests
translate themselves to the swarm's generation parameters with ``to_generation_params()``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MIN_TEMPERATURE = 1e-3  # below it (and above 0) logits / temperature overflow float32: use 0 for greedy
MAX_WARNED_FIELDS = 100  # distinct (model, field) names logged once each; past it, only counted

# Bounded numbers, shared by every schema (issue 24: an integer >= 2^63 reached a 64-bit column and answered 500).
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
NonNegativeInt64 = Annotated[int, Field(ge=0, le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # checked against the model's vocabulary when served
TokenCount = Annotated[int, Field(ge=0, le=1_000_000)]  # also checked against the model's context
Seed = Int64


def _no_nul(value: str) -> str:
    refuse_nul(value)
    return value


Name = Annotated[str, AfterValidator(_no_nul), Field(max_length=512)]  # looked up in the database


class UnknownFields:
    """Counts the unknown request fields by model and name; logs each new name once, and at most
    ``MAX_WARNED_FIELDS`` names (a request with 20,000 invented fields wrote 20,000 log lines, issue 24)."""

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()
        self.total = 0
        self._lock = threading.Lock()

    def add(self, model: str, names) -> None:
        names = list(names)
        with self._lock:
            self.total += len(names)
            new = [n for n in names if (model, n) not in self.counts]
            room = MAX_WARNED_FIELDS - len(self.counts)
            for name in new[: max(0, room)]:
                self.counts[(model, name)] = 0
            for name in names:
                if (model, name) in self.counts:
                    self.counts[(model, name)] += 1
        if new and room > 0:
            shown = ", ".join(repr(n[:40]) for n in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            logger.warning(f"{model}: ignoring unknown field(s) {shown} (counted in UNKNOWN_FIELDS from now on)")


UNKNOWN_FIELDS = UnknownFields()


def refuse_nul(data, depth: int = 0) -> None:
    """NUL characters are refused in every string (PostgreSQL cannot store one: it answered 500)."""
    if isinstance(data, str):
        if "\x00" in data:
            raise ValueError("strings may not contain NUL (\\u0000) characters")
    elif depth < 8 and isinstance(data, dict):
        for key, value in data.items():
            refuse_nul(key, depth + 1)
            refuse_nul(value, depth + 1)
    elif depth < 8 and isinstance(data, list):
        for value in data:
            refuse_nul(value, depth + 1)


class OpenAIBaseModel(BaseModel):
    """Base of every wire schema: unknown fields are accepted and counted; NaN and infinity are refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _count_unknown_fields(cls, data, handler):
        result = handler(data)
        if isinstance(data, dict) and result.model_extra:
            UNKNOWN_FIELDS.add(cls.__name__, result.model_extra)
        return result


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------- errors
class ErrorInfo(OpenAIBaseModel):
    """What went wrong, in OpenAI's format."""

    message: str = Field(description="A human-readable explanation, saying what to do next.")
    type: str = Field(
        description="Error class: invalid_request_error, authentication_error, insufficient_credits, "
        "rate_limit_error, not_found_error, service_unavailable or server_error."
    )
    param: str | None = Field(default=None, description="The request field at fault, as a dotted path.")
    code: str | None = Field(default=None, description="A machine-readable error code.")


class ErrorResponse(OpenAIBaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorInfo = Field(description="The error.")


# ---------------------------------------------------------------------------------------------------- usage, models
class UsageInfo(OpenAIBaseModel):
    """Tokens a request used, and what it cost: its route's receipts plus the operator's margin (docs/economics.md)."""

    prompt_tokens: int = Field(description="Tokens of the prompt (counted once, whatever ``n`` is).")
    completion_tokens: int = Field(description="Tokens generated, over all choices.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")
    cost: str | None = Field(default=None, description="Credits charged for the request (decimal string).")


class ModelCard(OpenAIBaseModel):
    """A model the gateway serves: a swarm model or one of the caller's fine-tuned models."""

    id: str = Field(description="The name to pass as ``model``.")
    object: Literal["model"] = Field(default="model", description="Always ``model``.")
    created: int = Field(default_factory=lambda: int(time.time()), description="Unix time.")
    owned_by: str = Field(default="nectar", description="``nectar`` (swarm models) or the owning account.")
    root: str | None = Field(default=None, description="The swarm model a fine-tuned model is based on.")
    max_model_len: int | None = Field(default=None, description="Context length in tokens.")


class ModelList(OpenAIBaseModel):
    """The models available to the caller."""

    object: Literal["list"] = Field(default="list", description="Always ``list``.")
    data: list[ModelCard] = Field(description="The models.")


# ---------------------------------------------------------------------------------------------------- generation
@dataclass
class GenerationParams:
    """Internal, swarm-side parameters of one generation (what ``DistributedModelForCausalLM.generate`` takes)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # top alternatives per generated token (None: no logprobs)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)
    json_schema: dict | bool | None = None  # every choice is a JSON document valid under it


class StreamOptions(OpenAIBaseModel):
    """Options of a streamed answer."""

    include_usage: bool = Field(default=False, description="Send a last chunk with the request's usage.")


StopField = str | list[str] | None
MAX_TOP_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI: 300)


class JsonSchemaFormat(OpenAIBaseModel):
    """The schema of ``response_format`` ``json_schema``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(max_length=64, description="A name for the schema (letters, digits, _ and -).")
    description: str | None = Field(default=None, max_length=4096, description="What the answer is for.")
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="A JSON schema; the answer is a JSON document valid under it."
    )
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


class ResponseFormat(OpenAIBaseModel):
    """``text`` (free), ``json_object`` (any JSON object) or ``json_schema`` (valid under a schema), enforced by
    constrained decoding in the gateway's sampler."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="What the answer must be.")
    json_schema: JsonSchemaFormat | None = Field(default=None, description="The schema, for ``json_schema``.")

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema: {"name", "schema"}')
        return self

    def enforced_schema(self) -> dict | bool | None:
        """The JSON schema the answer must satisfy, or None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            schema = self.json_schema.schema_
            return True if schema is None else schema  # no schema: any JSON document
        return None


class _SamplingFields(OpenAIBaseModel):
    """Sampling parameters shared by completions and chat completions."""

    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy; default 1.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass; default 1.")
    n: int = Field(default=1, ge=1, le=8, description="Choices to generate for each prompt.")
    stream: bool = Field(default=False, description="Answer with server-sent events, one per token.")
    stream_options: StreamOptions | None = Field(default=None, description="Options of a streamed answer.")
    stop: StopField = Field(default=None, description="Up to 4 strings that end generation (not included).")
    seed: Seed | None = Field(default=None, description="Seed for sampling, for reproducible samples.")
    presence_penalty: float | None = Field(
        default=0.0, ge=-2, le=2, description="Subtracted from the logit of every token already generated."
    )
    frequency_penalty: float | None = Field(
        default=0.0, ge=-2, le=2, description="Subtracted from a token's logit once per time it was generated."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit: 100 forces it, -100 bans it.",
    )
    response_format: ResponseFormat | None = Field(
        default=None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}.'
    )
    user: str | None = Field(default=None, description="An end-user id, for the caller's own records.")
    top_k: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Nectar extension: keep the k likeliest tokens."
    )
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=100, description="Nectar extension: >1 discourages repeating tokens."
    )

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None):
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise ValueError(f"logit_bias keys are token ids (decimal strings), got {key[:20]!r}")
            if not -100 <= value <= 100:  # NaN fails too
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {key}")
        return bias

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(key): float(value) for key, value in (self.logit_bias or {}).items()}

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a requested feature the swarm cannot honour, or None."""
        if len(self.stop_list()) > MAX_STOP_SEQUENCES:
            return "stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
        return None

    def logprobs_count(self) -> int | None:
        """Alternatives per generated token, or None for no logprobs."""
        return None

    def prompt_logprobs_count(self) -> int | None:
        return None

    def sampling_problem(self) -> tuple[str, str] | None:
        """(field, message) for values that would make the sampler's probabilities NaN or infinite, or None."""
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            return "temperature", f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}"
        return None

    def to_generation_params(self, max_new_tokens: int) -> GenerationParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        do_sample = temperature > 0
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=self.top_p if do_sample else None,
            top_k=self.top_k if do_sample else None,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop_list(),
            seed=self.seed,
            n=self.n,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias_ids() or None,
            logprobs=self.logprobs_count(),
            prompt_logprobs=self.prompt_logprobs_count(),
            json_schema=self.response_format.enforced_schema() if self.response_format else None,
        )


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: continue a text prompt."""

    model: Name = Field(description="A name from ``GET /v1/models``.")
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A string, a list of strings, token ids, or a list of token-id lists."
    )
    max_tokens: TokenCount | None = Field(default=16, description="Tokens to generate at most per choice.")
    echo: bool = Field(
        default=False, description="Prepend the prompt to each choice's text (with logprobs: the prompt's too)."
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return each token's logprob and this many likeliest alternatives (of the raw model logits).",
    )
    best_of: int | None = Field(default=None, ge=1, le=8, description="Only null or equal to n is supported.")
    suffix: str | None = Field(default=None, description="Not supported (must be null).")

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_count(self) -> int | None:
        return self.logprobs if self.echo else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, self.n):
            return "best_of", "best_of is not supported (use n)"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()


class TextContentPart(OpenAIBaseModel):
    """A piece of text in a message's content list."""

    type: Literal["text"] = Field(description="Only ``text`` parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(OpenAIBaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who speaks.")
    content: str | list[TextContentPart] | None = Field(default=None, description="Text, or text parts.")
    name: str | None = Field(default=None, description="Optional speaker name.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: answer a conversation, formatted with the model's chat template."""

    model: Name = Field(description="A name from ``GET /v1/models``.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: TokenCount | None = Field(
        default=None, ge=1, description="Tokens to generate at most (deprecated name)."
    )
    max_completion_tokens: TokenCount | None = Field(default=None, ge=1, description="Tokens to generate at most.")
    logprobs: bool | None = Field(default=None, description="Return each reply token's logprob.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: this many likeliest alternatives per token (of the raw model logits).",
    )
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported (must be empty).")
    tool_choice: Any = Field(default=None, description="Not supported.")

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.tools:
            return "tools", "tool calls are not supported"
        return super().unsupported()

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(OpenAIBaseModel):
    """Logprobs of a completion's tokens, in the legacy completions shape (one entry per token)."""

    tokens: list[str] = Field(default_factory=list, description="Each token's text.")
    token_logprobs: list[float | None] = Field(
        default_factory=list, description="Each token's logprob (null for the first prompt token with echo)."
    )
    top_logprobs: list[dict[str, float] | None] = Field(
        default_factory=list, description="The likeliest tokens at each position (and the chosen one), text -> logprob."
    )
    text_offset: list[int] = Field(default_factory=list, description="Where each token starts in the choice text.")


class TopLogprob(OpenAIBaseModel):
    """An alternative token at one position."""

    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its logprob under the model's raw distribution.")
    bytes: list[int] | None = Field(default=None, description="The token text's UTF-8 bytes.")


class ChatTokenLogprob(TopLogprob):
    """A reply token, its logprob and the likeliest alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list, description="The top_logprobs likeliest tokens.")


class ChoiceLogprobs(OpenAIBaseModel):
    """Logprobs of a chat reply's tokens."""

    content: list[ChatTokenLogprob] | None = Field(default=None, description="One entry per reply token.")


class CompletionChoice(OpenAIBaseModel):
    """One generated continuation."""

    index: int = Field(description="Position among the request's choices (prompt index * n + sample index).")
    text: str = Field(description="The generated text (after the prompt, unless echo).")
    logprobs: CompletionLogprobs | None = Field(default=None, description="If logprobs was set.")
    finish_reason: FinishReason | None = Field(description="``stop`` (end of text or a stop string) or ``length``.")


class CompletionResponse(OpenAIBaseModel):
    """The answer of ``POST /v1/completions``."""

    id: str = Field(default_factory=lambda: random_id("cmpl"), description="Request id.")
    object: Literal["text_completion"] = Field(default="text_completion", description="Always ``text_completion``.")
    created: int = Field(default_factory=lambda: int(time.time()), description="Unix time.")
    model: str = Field(description="The model that answered.")
    choices: list[CompletionChoice] = Field(description="The continuations.")
    usage: UsageInfo = Field(description="Tokens used and credits charged.")
    system_fingerprint: str | None = Field(default=None, description="Always null.")


class CompletionStreamChoice(OpenAIBaseModel):
    """New text of one choice in a streamed completion."""

    index: int = Field(description="Which choice this text belongs to.")
    text: str = Field(description="Text since the previous chunk.")
    logprobs: CompletionLogprobs | None = Field(default=None, description="Of this chunk's tokens.")
    finish_reason: FinishReason | None = Field(default=None, description="Set on the choice's last chunk.")


class CompletionStreamResponse(OpenAIBaseModel):
    """One server-sent event of a streamed completion."""

    id: str = Field(description="Request id (the same on every chunk).")
    object: Literal["text_completion"] = Field(default="text_completion", description="Always ``text_completion``.")
    created: int = Field(description="Unix time.")
    model: str = Field(description="The model that answers.")
    choices: list[CompletionStreamChoice] = Field(description="New text per choice (empty on the usage chunk).")
    usage: UsageInfo | None = Field(default=None, description="On the last chunk if stream_options.include_usage.")


class AssistantMessage(OpenAIBaseModel):
    """The model's reply."""

    role: Literal["assistant"] = Field(default="assistant", description="Always ``assistant``.")
    content: str = Field(description="The reply text.")


class ChatCompletionChoice(OpenAIBaseModel):
    """One generated reply."""

    index: int = Field(description="Which of the n replies this is.")
    message: AssistantMessage = Field(description="The reply.")
    logprobs: ChoiceLogprobs | None = Field(default=None, description="If logprobs was set.")
    finish_reason: FinishReason | None = Field(description="``stop`` or ``length``.")


class ChatCompletionResponse(OpenAIBaseModel):
    """The answer of ``POST /v1/chat/completions``."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"), description="Request id.")
    object: Literal["chat.completion"] = Field(default="chat.completion", description="Always ``chat.completion``.")
    created: int = Field(default_factory=lambda: int(time.time()), description="Unix time.")
    model: str = Field(description="The model that answered.")
    choices: list[ChatCompletionChoice] = Field(description="The replies.")
    usage: UsageInfo = Field(description="Tokens used and credits charged.")
    system_fingerprint: str | None = Field(default=None, description="Always null.")


class DeltaMessage(OpenAIBaseModel):
    """What a streamed chunk adds to a reply."""

    role: Literal["assistant"] | None = Field(default=None, description="Set on each reply's first chunk.")
    content: str | None = Field(default=None, description="Text since the previous chunk.")


class ChatCompletionStreamChoice(OpenAIBaseModel):
    """New text of one reply in a streamed chat completion."""

    index: int = Field(description="Which reply this belongs to.")
    delta: DeltaMessage = Field(description="The new part.")
    logprobs: ChoiceLogprobs | None = Field(default=None, description="Of this chunk's tokens.")
    finish_reason: FinishReason | None = Field(default=None, description="Set on the reply's last chunk.")


class ChatCompletionStreamResponse(OpenAIBaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str = Field(description="Request id (the same on every chunk).")
    object: Literal["chat.completion.chunk"] = Field(
        default="chat.completion.chunk", description="Always ``chat.completion.chunk``."
    )
    created: int = Field(description="Unix time.")
    model: str = Field(description="The model that answers.")
    choices: list[ChatCompletionStreamChoice] = Field(description="New text per reply (empty on the usage chunk).")
    usage: UsageInfo | None = Field(default=None, description="On the last chunk if stream_options.include_usage.")


# ---------------------------------------------------------------------------------------------------- files
class FileObject(OpenAIBaseModel):
    """An uploaded file."""

    id: str = Field(description="File id, e.g. ``file-...``.")
    object: Literal["file"] = Field(default="file", description="Always ``file``.")
    bytes: int = Field(description="Size in bytes.")
    created_at: int = Field(description="Unix time of the upload.")
    filename: str = Field(description="Name given at upload.")
    purpose: str = Field(description="``fine-tune`` (the only purpose used here).")
    status: Literal["processed"] = Field(default="processed", description="Always ``processed``.")
    status_details: str | None = Field(default=None, description="Always null.")


class FileList(OpenAIBaseModel):
    """The caller's files, newest first."""

    object: Literal["list"] = Field(default="list", description="Always ``list``.")
    data: list[FileObject] = Field(description="The files.")
    has_more: bool = Field(default=False, description="Always false.")


class FileDeleted(OpenAIBaseModel):
    """Confirmation of a deletion."""

    id: str = Field(description="The deleted file's id.")
    object: Literal["file"] = Field(default="file", description="Always ``file``.")
    deleted: bool = Field(description="True.")


# ---------------------------------------------------------------------------------------------------- fine-tuning
class Hyperparameters(OpenAIBaseModel):
    """Training settings of a prompt-tuning job (``auto`` picks the gateway's default)."""

    n_epochs: Annotated[int, Field(ge=1, le=10_000)] | Literal["auto"] = Field(  # steps: fine_tune_max_steps
        default="auto", description="Passes over the training file (auto: 3)."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto", description="Examples per step (auto: 4)."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        default="auto", description="Scales the gateway's base learning rate (auto: 1)."
    )
    pre_seq_len: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto", description="Nectar: soft-prompt tokens learned (auto: the gateway's)."
    )
    tuning_mode: Literal["ptune", "deep_ptune"] = Field(
        default="ptune", description="Nectar: ``ptune`` (input prefix) or ``deep_ptune`` (a prefix before every block)."
    )


class FineTuningJobCreate(OpenAIBaseModel):
    """``POST /v1/fine_tuning/jobs``: prompt-tune a swarm model on an uploaded JSONL file."""

    model: Name = Field(description="A swarm model from ``GET /v1/models`` (not a fine-tuned one).")
    training_file: Name = Field(
        description='Id of a ``fine-tune`` file: JSONL of {"prompt", "completion"} or {"messages": [...]} examples.'
    )
    hyperparameters: Hyperparameters | None = Field(default=None, description="Training settings.")
    suffix: str | None = Field(
        default=None,
        max_length=40,
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Up to 40 characters added to the fine-tuned model's name.",
    )
    validation_file: Name | None = Field(default=None, description="Not supported (must be null).")
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Seed of the prompt initialisation and example order."
    )


class FineTuningError(OpenAIBaseModel):
    """Why a job failed."""

    code: str = Field(description="Machine-readable code.")
    message: str = Field(description="What happened and what to do.")
    param: str | None = Field(default=None, description="The request field at fault, if any.")


class FineTuningJobHyperparameters(OpenAIBaseModel):
    """The settings a job runs with (``auto`` resolved)."""

    n_epochs: int = Field(description="Passes over the training file.")
    batch_size: int = Field(description="Examples per step.")
    learning_rate_multiplier: float = Field(description="Scale of the base learning rate.")
    pre_seq_len: int = Field(description="Soft-prompt tokens learned.")
    tuning_mode: str = Field(description="``ptune`` or ``deep_ptune``.")


class FineTuningJob(OpenAIBaseModel):
    """A prompt-tuning job and its progress."""

    id: str = Field(description="Job id, ``ftjob-...``.")
    object: Literal["fine_tuning.job"] = Field(default="fine_tuning.job", description="Always ``fine_tuning.job``.")
    created_at: int = Field(description="Unix time of creation.")
    finished_at: int | None = Field(default=None, description="Unix time it ended.")
    model: str = Field(description="The base model.")
    fine_tuned_model: str | None = Field(default=None, description="Name to use as ``model`` once succeeded.")
    organization_id: str = Field(description="The owning account, ``acct-<id>``.")
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="Where the job is."
    )
    hyperparameters: FineTuningJobHyperparameters = Field(description="The settings it runs with.")
    training_file: str = Field(description="The training file's id.")
    validation_file: str | None = Field(default=None, description="Always null.")
    result_files: list[str] = Field(default_factory=list, description="Always empty: results are the model.")
    trained_tokens: int | None = Field(default=None, description="Tokens processed so far (what is charged).")
    error: FineTuningError | None = Field(default=None, description="Why it failed.")
    seed: int = Field(description="The seed used.")
    estimated_finish: int | None = Field(default=None, description="Unix time it should finish, while running.")
    integrations: list[Any] | None = Field(default=None, description="Always null.")
    step: int = Field(default=0, description="Nectar: optimizer steps done.")
    total_steps: int = Field(default=0, description="Nectar: optimizer steps planned.")
    loss: float | None = Field(default=None, description="Nectar: training loss of the last step.")


class FineTuningJobList(OpenAIBaseModel):
    """The caller's jobs, newest first."""

    object: Literal["list"] = Field(default="list", description="Always ``list``.")
    data: list[FineTuningJob] = Field(description="The jobs.")
    has_more: bool = Field(description="Whether older jobs exist (page with ``after``).")


class FineTuningJobEvent(OpenAIBaseModel):
    """A status message or a training-step metric of a job."""

    id: str = Field(description="Event id, ``ftevent-<n>``.")
    object: Literal["fine_tuning.job.event"] = Field(
        default="fine_tuning.job.event", description="Always ``fine_tuning.job.event``."
    )
    created_at: int = Field(description="Unix time.")
    level: Literal["info", "warn", "error"] = Field(description="Severity.")
    message: str = Field(description="What happened.")
    data: dict[str, Any] | None = Field(default=None, description="Step metrics (step, total_steps, train_loss).")
    type: Literal["message", "metrics"] = Field(description="``metrics`` for per-step progress.")


class FineTuningJobEventList(OpenAIBaseModel):
    """A job's events, newest first."""

    object: Literal["list"] = Field(default="list", description="Always ``list``.")
    data: list[FineTuningJobEvent] = Field(description="The events.")
    has_more: bool = Field(description="Whether older events exist (page with ``after``).")


class ModelDeleted(OpenAIBaseModel):
    """Confirmation that a fine-tuned model was deleted."""

    id: str = Field(description="The model name.")
    object: Literal["model"] = Field(default="model", description="Always ``model``.")
    deleted: bool = Field(description="True.")
