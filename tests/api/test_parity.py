"""OpenAI parity through `nectar api` on the package's real swarm: logprobs and echo (an lm-evaluation-harness
log-likelihood task scores the same through the API as on the local model), presence/frequency penalties,
logit_bias, response_format json_object/json_schema by constrained decoding, all parsed by the official `openai`
client, and every invalid value a 400 in OpenAI's error shape that charges nothing."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest
import torch

from tests.api.conftest import Backend, new_customer

pytestmark = pytest.mark.slow
PRICE = 10  # micro-credits per token, the gateway's default
EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "count", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """SQLite only: these tests are about the answers, which do not depend on the database."""
    home = tmp_path_factory.mktemp("api-parity")
    return Backend("sqlite", f"sqlite:///{home / 'api.db'}", f"sqla+sqlite:///{home / 'api-broker.db'}", None)


@pytest.fixture(scope="module")
def customer(api):
    return new_customer(api, credits="5")


def local_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-softmax of the local model's logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------------- (a) lm_eval
TASK_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Paris is the capital of", "choices": [" France", " Spain", " Italy"], "answer": 0},
]


def run_task(model, tmp_path) -> list[list[tuple[float, bool]]]:
    """Each document's (loglikelihood, is_greedy) per choice, from lm_eval's samples of a local multiple-choice
    task."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in TASK_DOCS))
    (tmp_path / "nectar_tiny.yaml").write_text(
        "task: nectar_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    results = simple_evaluate(
        model=model, tasks=["nectar_tiny"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True
    )
    samples = sorted(results["samples"]["nectar_tiny"], key=lambda s: s["doc_id"])
    return [[tuple(r) for r in sample["filtered_resps"]] for sample in samples]


def test_lm_eval_loglikelihood_through_the_api_equals_the_local_model(api, market, customer, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", customer.key)
    remote = LocalCompletionsAPI(
        base_url=f"{api.url}/v1/completions",
        model=market.model,
        tokenizer=market.checkpoint,
        tokenizer_backend="huggingface",
        max_length=512,
        max_retries=1,
    )
    local = HFLM(pretrained=market.checkpoint, dtype="float32", device="cpu", batch_size=1)
    through_api = run_task(remote, tmp_path / "api")
    on_local = run_task(local, tmp_path / "local")
    assert [len(doc) for doc in through_api] == [len(doc["choices"]) for doc in TASK_DOCS]
    for api_doc, local_doc in zip(through_api, on_local, strict=True):
        for (api_ll, api_greedy), (local_ll, local_greedy) in zip(api_doc, local_doc, strict=True):
            assert math.isfinite(api_ll) and api_ll < 0
            assert api_ll == pytest.approx(local_ll, abs=1e-3)
            assert api_greedy == local_greedy


# ---------------------------------------------------------------------------------------------------- (b) JSON
def test_json_schema_answers_always_parse_and_validate(api, market, customer):
    client = customer.openai(max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe a thing as JSON."}]
    answers = []
    for seed in range(4):
        result = client.chat.completions.create(
            model=market.model,
            messages=messages,
            max_tokens=60,
            temperature=1.0,
            seed=seed,
            n=2,
            response_format=response_format,
        )
        answers += [(choice.message.content, choice.finish_reason) for choice in result.choices]
    streamed = client.completions.create(
        model=market.model,
        prompt="JSON:",
        max_tokens=60,
        seed=7,
        stream=True,
        extra_body={"response_format": response_format},
    )
    answers.append(("".join(chunk.choices[0].text for chunk in streamed if chunk.choices), "stop"))
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in answers}) > 1  # sampled, not one forced answer


def test_json_object_mode_starts_an_object_and_unconstrained_does_not(api, market, customer, tokenizer):
    client = customer.openai(max_retries=0)
    free = client.completions.create(model=market.model, prompt="Data:", max_tokens=8, temperature=0)
    constrained = client.completions.create(
        model=market.model,
        prompt="Data:",
        max_tokens=8,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert not free.choices[0].text.lstrip().startswith("{")  # the random model writes no JSON by itself
    assert constrained.choices[0].text.startswith("{")


# ---------------------------------------------------------------------------------------------------- (c) logprobs
def test_completion_logprobs_with_echo_equal_the_local_model(api, market, customer, tokenizer, reference):
    prompt = "The quick brown fox jumps over"
    ids = tokenizer(prompt)["input_ids"]
    client = customer.openai(max_retries=0)
    result = client.completions.create(
        model=market.model, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, echo=True
    )
    choice = result.choices[0]
    lp = choice.logprobs
    generated = len(lp.tokens) - len(ids)
    assert generated == result.usage.completion_tokens > 0
    assert lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(prompt)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert len(lp.text_offset) == len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    local = local_logprobs(reference, ids)
    for position in range(1, len(ids)):  # the prompt's tokens
        assert lp.token_logprobs[position] == pytest.approx(float(local[position - 1, ids[position]]), abs=1e-4)
        top = local[position - 1].topk(3)
        for token, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert lp.top_logprobs[position][tokenizer.decode([token])] == pytest.approx(value, abs=1e-4)
    sequence = list(ids)
    for step in range(generated):  # greedy: each generated token is the local top 1, with its logprob
        row = local_logprobs(reference, sequence)[-1]
        token = int(row.argmax())
        assert lp.tokens[len(ids) + step] == tokenizer.decode([token])
        assert lp.token_logprobs[len(ids) + step] == pytest.approx(float(row[token]), abs=1e-4)
        assert max(lp.top_logprobs[len(ids) + step].values()) == lp.token_logprobs[len(ids) + step]
        sequence.append(token)
    streamed = client.completions.create(
        model=market.model, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, echo=True, stream=True
    )
    tokens, values, offsets, text = [], [], [], ""
    for chunk in streamed:
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert (text, tokens, offsets) == (choice.text, lp.tokens, lp.text_offset)
    assert values[0] is None and values[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_scoring_a_prompt_with_max_tokens_0_costs_its_prompt(api, market, customer, tokenizer, reference):
    scorer = new_customer(api, credits="1")
    ids = tokenizer("Once upon a time there was")["input_ids"]
    result = scorer.openai(max_retries=0).completions.create(
        model=market.model, prompt=ids, max_tokens=0, logprobs=0, echo=True
    )
    lp = result.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    local = local_logprobs(reference, ids)
    expected = [float(local[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), 0)
    assert scorer.account()["spent_micro"] == len(ids) * PRICE


def test_chat_logprobs_whole_and_streamed_through_the_openai_client(api, market, customer, tokenizer, reference):
    client = customer.openai(max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    result = client.chat.completions.create(
        model=market.model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    generated = []
    ids = list(prompt_ids)
    for entry in content:  # greedy: replay each step locally, the chosen token is the local argmax
        row = local_logprobs(reference, ids)[-1]
        token = int(row.argmax())
        assert entry.token == tokenizer.decode([token]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert len(entry.top_logprobs) == 4 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)
        ids.append(token)
        generated.append(token)
    assert result.choices[0].message.content == tokenizer.decode(
        [t for t in generated if t != EOS], skip_special_tokens=True
    )
    chunks = client.chat.completions.create(
        model=market.model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4, stream=True
    )
    streamed = [
        e for chunk in chunks if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=market.model, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == result.choices[0].message.content


# ---------------------------------------------------------------------------------------------------- penalties, bias
def test_logit_bias_forces_and_bans_tokens(api, market, customer, tokenizer, reference):
    client = customer.openai(max_retries=0)
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    forced_token = tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    forced = client.completions.create(
        model=market.model, prompt=prompt, max_tokens=6, temperature=1.0, seed=3, logit_bias={str(forced_token): 100}
    )
    assert forced.choices[0].text == tokenizer.decode([forced_token] * 6)
    banned_id = int(local_logprobs(reference, ids)[-1].argmax())  # the greedy choice
    banned = client.completions.create(
        model=market.model, prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(banned_id): -100}, logprobs=0
    )
    assert banned.choices[0].logprobs.tokens[0] != tokenizer.decode([banned_id])
    assert tokenizer.decode([banned_id]) not in banned.choices[0].logprobs.tokens


def penalised_greedy(reference, ids, *, bias: dict[int, float], presence: float, frequency: float, steps: int):
    """OpenAI's definition, locally: argmax of raw logits + bias - frequency * count - presence * (count > 0),
    counting the tokens generated so far."""
    tokens: list[int] = []
    for _ in range(steps):
        scores = local_logprobs(reference, ids + tokens)[-1].clone()
        for token, value in bias.items():
            scores[token] += value
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=scores.shape[0]).float()
        scores -= counts * frequency + (counts > 0).float() * presence
        tokens.append(int(scores.argmax()))
        if tokens[-1] == EOS:
            break
    return tokens


def test_presence_and_frequency_penalties_follow_openai(api, market, customer, tokenizer, reference):
    client = customer.openai(max_retries=0)
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    favourite = tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    bias = {favourite: 8.0}  # makes " cat" the favourite: unpenalised greedy repeats it
    answers = {}
    for presence, frequency in ((0.0, 0.0), (1.5, 0.75), (0.0, 2.0), (-2.0, 0.0)):
        answer = client.completions.create(
            model=market.model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            logit_bias={str(favourite): 8},
            presence_penalty=presence,
            frequency_penalty=frequency,
        )
        expected = penalised_greedy(reference, ids, bias=bias, presence=presence, frequency=frequency, steps=8)
        assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), (presence, frequency)
        answers[presence, frequency] = answer.choices[0].text
    assert answers[0.0, 0.0].count(" cat") > answers[1.5, 0.75].count(" cat")


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": float("nan")}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
        ),
    ],
)
def test_invalid_options_get_400_in_openai_shape_and_charge_nothing(api, market, extra, param):
    payer = new_customer(api, credits="1")
    with payer.http() as h:
        body = json.dumps({"model": market.model, "prompt": "hi", "max_tokens": 2, **extra})  # NaN as Python writes it
        response = h.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error
    assert payer.account()["requests"] == 0


def test_chat_top_logprobs_bounds_and_need_logprobs(api, market):
    payer = new_customer(api, credits="1")
    client = payer.openai(max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    for extra, param in (
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=market.model, messages=messages, max_tokens=2, **extra)
        assert raised.value.body["param"] == param
    assert payer.account()["requests"] == 0
