"""The official `openai` client against a running `nectar api` on a real swarm, on SQLite and on PostgreSQL/Redis:
completions, chat, streaming, stop strings, n; usage counted and debited exactly; 401, 402, 400, 429; and a
load test of concurrent requests on one account that must never overdraw nor lose a charge."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.api.conftest import new_customer
from tests.api.utils import wait_for

pytestmark = pytest.mark.slow
PRICE = 10  # micro-credits per token, the gateway's default


def local_greedy(reference, input_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0
        )
    return out[0, len(input_ids) :].tolist()


def test_models_lists_the_swarm_model(api, market):
    customer = new_customer(api)
    models = customer.openai().models.list()
    assert [m.id for m in models.data if m.root is None] == [market.model]  # the others: its LoRA adapters
    assert models.data[0].max_model_len == 512
    with pytest.raises(openai.NotFoundError):
        customer.openai().models.retrieve("no-such-model")


def test_completion_matches_local_model_and_is_debited_exactly(api, market, tokenizer, reference):
    customer = new_customer(api, credits="1")
    before = customer.account()["balance_micro"]
    prompt = "The quick brown fox"
    result = customer.openai().completions.create(model=market.model, prompt=prompt, max_tokens=12, temperature=0)
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = local_greedy(reference, prompt_ids, 12)
    choice = result.choices[0]
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == len(expected)
    assert result.usage.total_tokens == len(prompt_ids) + len(expected)
    assert choice.finish_reason == ("stop" if expected[-1] == 2 else "length")
    after = customer.account()
    assert before - after["balance_micro"] == result.usage.total_tokens * PRICE
    assert after["held_micro"] == 0
    [usage] = customer.usage()
    assert (usage["reference"], usage["cost_micro"]) == (result.id, result.usage.total_tokens * PRICE)


def test_chat_uses_the_chat_template(api, market, tokenizer, reference):
    customer = new_customer(api, credits="1")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    result = customer.openai().chat.completions.create(
        model=market.model, messages=messages, max_tokens=10, temperature=0
    )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = local_greedy(reference, prompt_ids, 10)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert customer.account()["spent_micro"] == result.usage.total_tokens * PRICE


def test_streams_equal_whole_answers_and_charge_the_same(api, market):
    customer = new_customer(api, credits="1")
    client = customer.openai()
    whole = client.completions.create(model=market.model, prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model=market.model,
            prompt="Once upon a time",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len([c for c in chunks if c.choices]) >= 2  # token by token, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens

    messages = [{"role": "user", "content": "Tell me a story."}]
    chat_whole = client.chat.completions.create(model=market.model, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=market.model,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_chunks = list(stream)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
        == chat_whole.choices[0].message.content
    )
    assert chat_chunks[-1].usage.completion_tokens == chat_whole.usage.completion_tokens
    spent = whole.usage.total_tokens * 2 + chat_whole.usage.total_tokens * 2
    account = customer.account()
    assert (account["spent_micro"], account["requests"], account["held_micro"]) == (spent * PRICE, 4, 0)


def test_stop_string_ends_the_choice_and_is_not_returned(api, market, tokenizer):
    customer = new_customer(api, credits="1")
    client = customer.openai()
    free = client.completions.create(model=market.model, prompt="In the beginning", max_tokens=16, temperature=0)
    words = free.choices[0].text.split()
    assert len(words) >= 4, free.choices[0].text
    stop = words[2]
    cut = free.choices[0].text.index(stop)
    stopped = client.completions.create(
        model=market.model, prompt="In the beginning", max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == free.choices[0].text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < free.usage.completion_tokens
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=market.model, prompt="In the beginning", max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == stopped.choices[0].text


def test_n_choices_with_seeded_sampling(api, market):
    customer = new_customer(api, credits="1")
    client = customer.openai()
    kwargs = dict(model=market.model, prompt="Hello", max_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # the seed makes it reproducible
    assert len({c.text for c in first.choices}) > 1  # three different samples
    assert first.usage.completion_tokens <= 3 * 8
    assert customer.account()["spent_micro"] == (first.usage.total_tokens + again.usage.total_tokens) * PRICE


def test_bad_key_gets_401(api, market):
    bad = new_customer(api)
    bad.key = "nk-not-a-real-key"
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.openai(max_retries=0).completions.create(model=market.model, prompt="hi", max_tokens=2)
    assert raised.value.status_code == 401
    assert raised.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{api.url}/v1/completions", json={"model": market.model, "prompt": "hi"})
    assert response.status_code == 401 and "Authorization: Bearer" in response.json()["error"]["message"]


def test_revoked_key_gets_401(api, market):
    customer = new_customer(api, credits="1")
    with customer.http() as h:
        second = h.post("/v1/account/keys", json={"name": "temp"}).json()
        assert h.delete(f"/v1/account/keys/{second['key']['id']}").json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key=second["api_key"], max_retries=0).models.list()


def test_no_credit_gets_402_and_loses_nothing(api, market):
    customer = new_customer(api, credits="0.0001")  # 100 micro-credits: 10 tokens
    with pytest.raises(openai.APIStatusError) as raised:
        customer.openai(max_retries=0).completions.create(model=market.model, prompt="Hello there", max_tokens=50)
    assert raised.value.status_code == 402
    message = raised.value.body["message"]
    assert "Insufficient credits" in message and "0.000100" in message and "depositFor" in message
    account = customer.account()
    assert (account["balance_micro"], account["held_micro"], account["requests"]) == (100, 0, 0)
    stream = httpx.post(
        f"{api.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {customer.key}"},
        json={"model": market.model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 50},
    )
    assert stream.status_code == 402 and stream.json()["error"]["type"] == "insufficient_credits"
    small = customer.openai().completions.create(model=market.model, prompt="Hi", max_tokens=3, temperature=0)
    assert customer.account()["balance_micro"] == 100 - small.usage.total_tokens * PRICE


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "M", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "M", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"model": "M", "prompt": "hi", "n": 100}, "n"),
    ],
)
def test_malformed_completion_gets_400_naming_the_field(api, market, body, field):
    customer = new_customer(api, credits="1")
    body = {k: (market.model if v == "M" else v) for k, v in body.items()}
    with customer.http() as h:
        response = h.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text  # as OpenAI and vLLM
    error = response.json()["error"]
    assert error["param"] == field and f"'{field}'" in error["message"]
    assert customer.account()["requests"] == 0


def test_malformed_chat_gets_400_through_the_openai_client(api, market):
    customer = new_customer(api, credits="1")
    with pytest.raises(openai.BadRequestError) as raised:
        customer.openai(max_retries=0).chat.completions.create(
            model=market.model, messages=[{"role": "wizard", "content": "hi"}], max_tokens=2
        )
    assert raised.value.body["param"] == "messages.0.role"
    with customer.http() as h:
        not_json = h.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        empty = h.post("/v1/chat/completions", json={"model": market.model, "messages": []})
    assert not_json.status_code == 400 and empty.status_code == 400
    assert empty.json()["error"]["param"] == "messages"


def test_unsupported_options_get_400_and_unknown_model_404(api, market):
    customer = new_customer(api, credits="1")
    client = customer.openai(max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=market.model, prompt="hi", max_tokens=2, suffix="!")
    assert raised.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=market.model, prompt="hi", max_tokens=600)
    assert raised.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert customer.account()["requests"] == 0


def test_rate_limit_per_key(api, market):
    customer = new_customer(api, credits="1")
    with customer.http() as h:
        limited = h.post("/v1/account/keys", json={"name": "slow", "rate_limit_per_minute": 3}).json()["api_key"]
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=limited, max_retries=0)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as raised:
        client.models.list()
    assert int(raised.value.response.headers["Retry-After"]) >= 1
    customer.openai().models.list()  # the account's other key is not limited


def test_concurrent_requests_never_overdraw_and_lose_no_charge(api, market, tokenizer):
    """40 requests at once on an account that can hold only 12 of them; then drain it to the last credit."""
    hold = (len(tokenizer("One two three")["input_ids"]) + 8) * PRICE  # a request's worst case
    customer = new_customer(api, credits=f"{12 * hold / 1e6:.6f}")
    with customer.http() as h:
        fast = h.post("/v1/account/keys", json={"rate_limit_per_minute": 10_000}).json()["api_key"]
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=fast, max_retries=0, timeout=300)
    initial = customer.account()["balance_micro"]
    assert initial == 12 * hold
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            account = customer.account()
            seen.append((account["balance_micro"], account["held_micro"]))

    def one(i):
        try:
            r = client.completions.create(
                model=market.model, prompt="One two three", max_tokens=8, temperature=0.8, seed=i
            )
            return r.usage.total_tokens
        except openai.APIStatusError as e:
            assert e.status_code == 402, e
            return None

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(one, range(40)))
        paid = [tokens for tokens in results if tokens is not None]
        assert len(paid) >= 12 and len(paid) < 40  # 12 fit at once; the rest wait for refunds or get 402
        first_wave = len(paid)
        # drain: keep asking until nothing fits any more
        for i in range(200):
            tokens = one(100 + i)
            if tokens is None:
                break
            paid.append(tokens)
    finally:
        stop.set()
        watcher.join()
    account = customer.account()
    assert account["held_micro"] == 0
    assert account["balance_micro"] >= 0 and account["balance_micro"] < hold  # drained to below one request
    assert initial - account["balance_micro"] == sum(paid) * PRICE  # every charge landed, exactly once
    usage = customer.usage()
    assert len(usage) == len(paid) and sum(u["cost_micro"] for u in usage) == sum(paid) * PRICE
    assert seen and all(balance >= 0 and held >= 0 for balance, held in seen)
    assert max(held for _, held in seen) <= initial
    print(
        f"load test: 40 concurrent -> {first_wave} served, {40 - first_wave} got 402; {len(paid)} served in all; "
        f"{initial - account['balance_micro']} of {initial} micro-credits charged, {len(seen)} balance samples >= 0"
    )


def test_a_client_that_leaves_mid_stream_pays_for_what_was_generated(api, market):
    customer = new_customer(api, credits="1")
    body = {
        "model": market.model,
        "prompt": "A very long story:",
        "max_tokens": 300,
        "temperature": 0.8,
        "seed": 3,
        "stream": True,
    }
    with customer.http() as h:
        with h.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line.startswith("data: {"))
            received = [json.loads(next(events)[6:]) for _ in range(3)]
        # leaving the block drops the connection mid-generation
    assert all(chunk["object"] == "text_completion" for chunk in received)
    wait_for(lambda: customer.account()["held_micro"] == 0, 60, "the stream's hold to be settled")
    [usage] = customer.usage()
    assert 3 <= usage["completion_tokens"] < 300  # generation stopped soon after the client left
    assert usage["cost_micro"] == (usage["prompt_tokens"] + usage["completion_tokens"]) * PRICE
    assert customer.account()["balance_micro"] == 10**6 - usage["cost_micro"]


def test_an_oversized_body_gets_413(api, market):
    customer = new_customer(api, credits="1")
    with customer.http() as h:
        response = h.post("/v1/completions", json={"model": market.model, "prompt": "x" * (2 * 1024 * 1024)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert customer.account()["requests"] == 0


def test_a_chunked_body_over_the_limit_gets_413(api, market):
    """Issue 22: the limit trusted Content-Length, so a chunked body (which declares none) of any size was read."""
    customer = new_customer(api, credits="1")
    prompt = json.dumps({"model": market.model, "prompt": "x" * (3 * 1024 * 1024)}).encode()

    def chunks():
        for i in range(0, len(prompt), 256 * 1024):
            yield prompt[i : i + 256 * 1024]

    with customer.http() as h:
        response = h.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert customer.account()["requests"] == 0
