"""Concurrency end to end (issue 24): requests run as concurrent swarm sessions (the nodes batch their steps), a full
queue answers 503 + Retry-After at once, and a client that disconnects (streamed or not) stops its generation, frees
its slot for the next request and pays only for what was computed. A real swarm (the package's market), SQLite."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from nectar.api.launch import ApiProcess
from tests.api.conftest import new_customer
from tests.api.utils import api_env

pytestmark = pytest.mark.slow
PRICE = 10  # micro-credits per token, the gateway's default
LONG = 400  # tokens a generation would run for if nothing stopped it (the tiny model's context is 512)


def _api(market, tmp_path_factory, name: str, **settings) -> ApiProcess:
    home = tmp_path_factory.mktemp(name)
    env = api_env(
        home=market.home,
        database_url=f"sqlite:///{home / 'api.db'}",
        broker_url=f"sqla+sqlite:///{home / 'api-broker.db'}",
        model=market.checkpoint,
        peers=market.peers,
        ledger_url=market.ledger_url,
        **settings,
    )
    return ApiProcess(env=env, log_dir=home)


@pytest.fixture(scope="module")
def default_api(market, tmp_path_factory):
    """The gateway with its default concurrency settings."""
    server = _api(market, tmp_path_factory, "api-default")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_slot_api(market, tmp_path_factory):
    """One generation at a time and no queue: a second request finds the slot free, or is refused at once."""
    server = _api(market, tmp_path_factory, "api-one-slot", max_concurrent_generations=1, max_queued_generations=0)
    yield server
    server.stop()


def _long_body(market, *, stream: bool, seed: int = 3) -> dict:
    # sampling: a random tiny model's greedy path can reach EOS early; a sampled one practically never does
    return {"model": market.model, "prompt": "A very long story:", "max_tokens": LONG, "temperature": 0.8,
            "seed": seed, "stream": stream}  # fmt: skip


def _short_request(customer, market) -> httpx.Response:
    with customer.http() as h:
        return h.post("/v1/completions", json={"model": market.model, "prompt": "Hi", "max_tokens": 4})


def _settled(customer) -> dict:
    """The account once no hold is left, and its one usage record."""
    deadline = time.monotonic() + 60
    while (account := customer.account())["held_micro"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert account["held_micro"] == 0, account
    return account


def _free_slot_serves(customer, market) -> httpx.Response:
    """The next request, sent right after a client left. With one slot and no queue it is served only if the
    slot is free; the server learns of the disconnect within moments, so a 503 is retried for up to 5 s."""
    deadline = time.monotonic() + 5
    while True:
        response = _short_request(customer, market)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def _check_charged_for_work_done(customer, *, received_tokens: int = 0) -> dict:
    account = _settled(customer)
    [usage] = customer.usage()
    assert received_tokens <= usage["completion_tokens"] < LONG  # stopped soon after the client left
    assert usage["cost_micro"] == (usage["prompt_tokens"] + usage["completion_tokens"]) * PRICE
    assert account["balance_micro"] == 10**6 - usage["cost_micro"]  # charged exactly the work done, nothing held
    return usage


def test_the_long_request_runs_to_max_tokens_when_nobody_leaves(one_slot_api, market):
    """The premise of the disconnect tests: left alone, their request generates all LONG tokens (no early EOS)."""
    customer = new_customer(one_slot_api, credits="1")
    began = time.monotonic()
    with customer.http() as h:
        answer = h.post("/v1/completions", json=_long_body(market, stream=False))
    assert answer.status_code == 200, answer.text
    print(f"{LONG} tokens in {time.monotonic() - began:.1f}s")
    assert answer.json()["usage"]["completion_tokens"] == LONG


def test_a_non_streamed_request_whose_client_leaves_stops_and_frees_its_slot(one_slot_api, market):
    leaver, next_user = new_customer(one_slot_api, credits="1"), new_customer(one_slot_api, credits="1")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-generation and closes the connection
        with httpx.Client(base_url=one_slot_api.url, headers={"Authorization": f"Bearer {leaver.key}"}) as h:
            h.post("/v1/completions", json=_long_body(market, stream=False), timeout=httpx.Timeout(60, read=1))
    answer = _free_slot_serves(next_user, market)
    assert answer.status_code == 200, answer.text  # the one slot was freed: before, the leaver ran to LONG tokens
    _check_charged_for_work_done(leaver)


def test_a_streamed_request_whose_client_leaves_stops_and_frees_its_slot(one_slot_api, market):
    leaver, next_user = new_customer(one_slot_api, credits="1"), new_customer(one_slot_api, credits="1")
    with leaver.http() as h:
        with h.stream("POST", "/v1/completions", json=_long_body(market, stream=True)) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line.startswith("data: {"))
            received = [json.loads(next(events)[6:]) for _ in range(3)]
    assert all(chunk["object"] == "text_completion" for chunk in received)
    answer = _free_slot_serves(next_user, market)
    assert answer.status_code == 200, answer.text
    _check_charged_for_work_done(leaver, received_tokens=1)


def test_a_full_queue_answers_503_with_retry_after_and_charges_nothing(one_slot_api, market):
    """Six requests at once on one slot and no queue: one runs, the others are refused at once, charged nothing."""
    customers = [new_customer(one_slot_api, credits="1") for _ in range(6)]
    barrier = threading.Barrier(len(customers))

    def one(customer) -> httpx.Response:
        with customer.http() as h:
            barrier.wait()
            return h.post("/v1/completions", json=_long_body(market, stream=False))

    with ThreadPoolExecutor(len(customers)) as pool:
        answers = list(pool.map(one, customers))
    statuses = [a.status_code for a in answers]
    # before: all six queued and were served one after the other
    assert set(statuses) == {200, 503}, [(a.status_code, a.text[:300]) for a in answers]
    for customer, answer in zip(customers, answers):
        account = _settled(customer)
        if answer.status_code == 200:
            continue
        assert 1 <= int(answer.headers["Retry-After"]) <= 60
        error = answer.json()["error"]  # OpenAI's error shape: the official client retries after Retry-After
        assert error["code"] == "server_overloaded" and error["type"] == "service_unavailable"
        assert "Retry-After" in error["message"]
        # refused before any work: nothing charged (one refused between its hold and its start records 0 tokens)
        assert account["balance_micro"] == 10**6
        assert all(u["cost_micro"] == 0 and u["completion_tokens"] == 0 for u in customer.usage())


def test_concurrent_requests_are_generated_concurrently(default_api, market):
    """Four streams at once: each one's tokens arrive while the others' do (one swarm session each, batched by the
    nodes into shared rounds); with a single generation slot, each would start only after the previous ended."""
    customers = [new_customer(default_api, credits="1") for _ in range(4)]
    spans: dict[int, tuple[float, float, int]] = {}
    errors: list[str] = []
    start = threading.Barrier(len(customers))

    def one(i: int) -> None:
        try:
            body = {**_long_body(market, stream=True, seed=i), "max_tokens": 48}
            with customers[i].http() as h:
                start.wait()
                with h.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200, response.read()
                    times = [time.monotonic() for line in response.iter_lines() if line.startswith("data: {")]
            spans[i] = (times[0], times[-1], len(times))
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(customers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(spans) == len(customers)
    latest_first = max(first for first, _, _ in spans.values())
    earliest_last = min(last for _, last, _ in spans.values())
    assert latest_first < earliest_last, spans  # every stream had begun before any ended: they overlapped
    for customer in customers:
        _settled(customer)
        [usage] = customer.usage()
        assert usage["completion_tokens"] == 48


def test_sigterm_stops_nectar_api_and_every_child(market, tmp_path_factory):
    """SIGTERM to the gateway's process alone (as systemd or docker send it), with a generation in flight: the
    process and every process it started (hivemind's DHT process, p2pd daemons) end, as on Ctrl-C."""
    server = _api(market, tmp_path_factory, "api-sigterm")
    children = []
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert children  # the swarm client's DHT process and daemons
        customer = new_customer(server, credits="1")
        with customer.http() as h:
            with h.stream("POST", "/v1/completions", json=_long_body(market, stream=True)) as response:
                assert response.status_code == 200
                next(line for line in response.iter_lines() if line.startswith("data: {"))
                os.kill(server.process.pid, signal.SIGTERM)
        server.process.wait(60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, " ".join(p.cmdline())[:200]) for p in alive]
    finally:
        for child in children:  # leave nothing behind, whatever happened
            if child.is_running():
                child.kill()
        server.stop()
