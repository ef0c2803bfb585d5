"""Abuse-proof by default (issue 24): what users and abusers can do from the outside, against a running `nectar api`
(SQLite and PostgreSQL + Redis). Every test here failed on the code before the fix.

The API here trusts 127.0.0.1 as a proxy, so each test speaks for its own client address through X-Forwarded-For
(which also checks that per-address counters follow the proxy's header)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from nectar.wire.request_auth import MAX_SKEW
from tests.api.conftest import ADMIN, new_customer, node_key
from tests.api.utils import market_api_env, signed_for, wait_for

pytestmark = pytest.mark.slow

RATE_CAP = 30  # the operator's per-key limit
MAX_KEYS = 3
AUTH_FAILURES = 5
SIGNUPS = 3


@pytest.fixture(scope="module")
def api_environment(market, backend) -> dict:
    return market_api_env(
        market,
        backend,
        rate_limit_per_minute=RATE_CAP,
        max_keys_per_account=MAX_KEYS,
        auth_failures_per_minute=AUTH_FAILURES,
        signups_per_hour=SIGNUPS,
        trusted_proxies="127.0.0.1",
    )


def from_address() -> dict:
    """A client address of its own (10.x.y.z), as the trusted proxy (127.0.0.1) would pass it on."""
    n = uuid.uuid4().int
    return {"X-Forwarded-For": f"10.{n % 250}.{n // 250 % 250}.{n // 62500 % 250 + 1}"}


def admin_customer(api):
    """A customer created with the admin token (not counted against sign-ups)."""
    with httpx.Client(base_url=api.url, timeout=60) as h:
        created = h.post("/v1/accounts", json={"name": "abuse"}, headers=ADMIN)
        assert created.status_code == 201, created.text
    body = created.json()
    return body, {"Authorization": f"Bearer {body['api_key']}", **from_address()}


# ---------------------------------------------------------------------------------------------------- keys, limits
def test_a_key_can_lower_its_rate_limit_but_never_raise_it(api):
    """Before: POST /v1/account/keys took any rate_limit_per_minute up to 1,000,000 (the user's own policy)."""
    _, headers = admin_customer(api)
    with httpx.Client(base_url=api.url, headers=headers, timeout=60) as h:
        raised = h.post("/v1/account/keys", json={"rate_limit_per_minute": RATE_CAP + 1})
        assert raised.status_code == 400, raised.text
        assert raised.json()["error"]["code"] == "rate_limit_above_policy"
        assert raised.json()["error"]["param"] == "rate_limit_per_minute"
        lowered = h.post("/v1/account/keys", json={"rate_limit_per_minute": 3})
        assert lowered.status_code == 201 and lowered.json()["key"]["rate_limit_per_minute"] == 3
    slow = {"Authorization": f"Bearer {lowered.json()['api_key']}", **from_address()}
    with httpx.Client(base_url=api.url, headers=slow, timeout=60) as h:
        answers = [h.get("/v1/account").status_code for _ in range(7)]
    assert 429 in answers, answers  # 3 a minute: even across one window boundary, at most 6 of 7 pass


def test_an_account_holds_at_most_max_keys(api):
    """Before: an account could create keys without end (each one a fresh rate limit)."""
    _, headers = admin_customer(api)
    with httpx.Client(base_url=api.url, headers=headers, timeout=60) as h:
        made = [h.post("/v1/account/keys", json={"name": f"k{i}"}) for i in range(MAX_KEYS)]
        assert [r.status_code for r in made] == [201] * (MAX_KEYS - 1) + [400]  # the account's first key counts
        assert made[-1].json()["error"]["code"] == "too_many_keys"
        assert h.delete(f"/v1/account/keys/{made[0].json()['key']['id']}").status_code == 200
        assert h.post("/v1/account/keys", json={"name": "again"}).status_code == 201  # revoking frees a place


def test_concurrent_key_creations_respect_the_cap(api):
    """Before: each creation counted the keys, then inserted, in its own transaction: on PostgreSQL, requests racing
    each other all saw room and the account ended above the cap."""
    _, headers = admin_customer(api)

    async def race() -> list[int]:
        async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=60) as h:
            made = await asyncio.gather(*(h.post("/v1/account/keys", json={"name": f"r{i}"}) for i in range(12)))
            live = [k for k in (await h.get("/v1/account/keys")).json() if not k["revoked"]]
        assert len(live) == MAX_KEYS, live
        return [r.status_code for r in made]

    codes = asyncio.run(race())
    assert sorted(codes) == [201] * (MAX_KEYS - 1) + [400] * (12 - MAX_KEYS + 1), codes


def test_failed_authentications_are_throttled_per_client_address(api):
    """Before: any number of wrong keys got 401 each, as fast as they came."""
    _, good = admin_customer(api)
    guesser = from_address()
    with httpx.Client(base_url=api.url, timeout=60) as h:
        answers = [
            h.get("/v1/account", headers={"Authorization": f"Bearer nk-guess{i}", **guesser}).status_code
            for i in range(AUTH_FAILURES + 2)
        ]
        assert answers == [401] * AUTH_FAILURES + [429, 429], answers
        blocked = h.get("/v1/account", headers={"Authorization": good["Authorization"], **guesser})
        assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
        assert blocked.json()["error"]["code"] == "too_many_auth_failures"
        assert h.get("/v1/account", headers=good).status_code == 200  # other addresses are not affected


def test_admin_token_and_signature_guesses_are_throttled_too(api, market):
    """Before: the admin token could be guessed as fast as requests came (and was compared with ==)."""
    guesser = from_address()
    with httpx.Client(base_url=api.url, timeout=60) as h:
        answers = [
            h.post(
                "/v1/admin/accounts/1/credit",
                json={"credits": "1"},
                headers={"Authorization": f"Bearer x{i}", **guesser},
            )
            for i in range(AUTH_FAILURES - 1)
        ]
        assert [a.status_code for a in answers] == [401] * (AUTH_FAILURES - 1)
        path = f"/v1/nodes/{market.swarm.nodes[0].eth_address}/earnings"
        forged = {**signed_for(api.url, node_key(market, "beta"), "GET", "/elsewhere"), **guesser}
        assert h.get(path, headers=forged).status_code == 401  # the fifth failure
        assert h.get(path, headers={**ADMIN, **guesser}).status_code == 429  # even the right token, for a while


def test_signups_are_throttled_per_client_address(api):
    """Before: POST /v1/accounts created accounts without end."""
    me, other = from_address(), from_address()
    with httpx.Client(base_url=api.url, timeout=60) as h:
        answers = [h.post("/v1/accounts", json={"name": "s"}, headers=me).status_code for _ in range(SIGNUPS + 1)]
        assert answers == [201] * SIGNUPS + [429], answers
        assert h.post("/v1/accounts", json={"name": "s"}, headers=other).status_code == 201
        assert h.post("/v1/accounts", json={"name": "s"}, headers={**ADMIN, **me}).status_code == 201  # operator


def test_a_forwarded_address_counts_only_from_a_trusted_proxy():
    """X-Forwarded-For is the caller's to write: only a configured proxy's is believed, and then its last hop that
    is not a proxy (a client-written first hop would let every request pick a fresh address)."""
    from starlette.requests import Request

    from nectar.api.deps import client_address

    def request(peer: str, forwarded: str) -> Request:
        headers = [(b"x-forwarded-for", forwarded.encode())]
        return Request({"type": "http", "client": (peer, 5000), "headers": headers})

    assert client_address(request("203.0.113.9", "1.2.3.4"), []) == "203.0.113.9"
    assert client_address(request("203.0.113.9", "1.2.3.4"), ["10.0.0.0/8"]) == "203.0.113.9"  # not a proxy
    assert client_address(request("10.0.0.2", "6.6.6.6, 1.2.3.4"), ["10.0.0.0/8"]) == "1.2.3.4"
    assert client_address(request("10.0.0.2", "1.2.3.4, 10.0.0.7"), ["10.0.0.0/8"]) == "1.2.3.4"


def test_signup_is_closed_outside_a_devnet_unless_the_operator_opens_it():
    """Before: allow_signup defaulted to True in every environment."""
    from eth_account import Account

    from nectar.api.core.config import Settings

    secret = {"admin_token": "x" * 32, "environment": "production", "private_key": Account.create().key.hex()}
    assert Settings(**secret).signup_open is False
    assert Settings(**secret, allow_signup=True).signup_open is True
    assert Settings().signup_open is True  # devnet
    assert Settings(allow_signup=False).signup_open is False


# ---------------------------------------------------------------------------------------------------- inputs
def test_unknown_fields_are_counted_not_logged_one_by_one(api, market):
    """Before: each unknown field name was logged once: 2,000 invented fields wrote 2,000 log lines."""
    _, headers = admin_customer(api)
    grant = httpx.post(
        f"{api.url}/v1/admin/accounts/{_account_id(api, headers)}/credit", json={"credits": "1"}, headers=ADMIN
    )
    assert grant.status_code == 200, grant.text
    tag = uuid.uuid4().hex[:8]
    body = {"model": market.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    body.update({f"junk_{tag}_{i}": i for i in range(2000)})
    before = httpx.get(f"{api.url}/health").json()["unknown_fields"]
    answer = httpx.post(f"{api.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    assert httpx.get(f"{api.url}/health").json()["unknown_fields"] - before == 2000
    assert len([line for line in api.log().splitlines() if f"junk_{tag}" in line]) <= 1


def _account_id(api, headers) -> int:
    return int(httpx.get(f"{api.url}/v1/account", headers=headers).json()["id"].removeprefix("acct-"))


HUGE = 2**64
HOSTILE_BODIES = [
    ("/v1/completions", {"prompt": "x", "seed": HUGE}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**63}),
    ("/v1/completions", {"prompt": [[HUGE]], "max_tokens": 1}),
    ("/v1/completions", {"prompt": [2**40], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "x", "top_k": HUGE, "temperature": 1, "max_tokens": 1}),
    ("/v1/completions", {"prompt": "x", "best_of": HUGE}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": HUGE}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": HUGE}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e-300}),
    ("/v1/fine_tuning/jobs", {"training_file": "file-x", "seed": HUGE}),
    ("/v1/fine_tuning/jobs", {"training_file": "file-x", "hyperparameters": {"n_epochs": HUGE}}),
    ("/v1/account/keys", {"rate_limit_per_minute": HUGE}),
    ("/v1/account/faucet", {"credits": "1e400"}),
    # PostgreSQL cannot store or compare a NUL character: names and ids holding one gave 500 there
    ("/v1/completions", {"model": "tiny\x00", "prompt": "x", "max_tokens": 1}),
    ("/v1/fine_tuning/jobs", {"training_file": "file-\x00"}),
    ("/v1/account/keys", {"name": "k\x00"}),
]


def test_no_number_or_string_gives_a_server_error(api, market):
    """Before: integers >= 2^63 reached 64-bit columns and torch and answered 500; NaN and 1e400 were floats; a NUL
    character in a name or id answered 500 on PostgreSQL."""
    body, headers = admin_customer(api)
    account = body["account"]["id"].removeprefix("acct-")
    problems = []
    with httpx.Client(base_url=api.url, headers=headers, timeout=120) as h:
        for path, payload in HOSTILE_BODIES:
            payload = {"model": market.model, **payload}  # the model, unless the case names one
            answer = h.post(path, json=payload)
            if answer.status_code not in (400, 402, 404, 422):
                problems.append((path, payload, answer.status_code, answer.text[:200]))
        raw = b'{"model": "%s", "prompt": "x", "temperature": NaN, "max_tokens": 1}' % market.model.encode()
        for path, content, headers_ in (
            ("/v1/completions", raw, {"content-type": "application/json"}),
            ("/v1/completions", raw.replace(b"NaN", b"Infinity"), {"content-type": "application/json"}),
        ):
            answer = h.post(path, content=content, headers=headers_)
            if answer.status_code not in (400, 422):
                problems.append((path, content[:80], answer.status_code, answer.text[:200]))
        for method, path in (
            ("DELETE", f"/v1/account/keys/{HUGE}"),
            ("GET", "/v1/files/file-%00"),
            ("GET", "/v1/models/tiny%00"),
            ("GET", "/v1/fine_tuning/jobs?after=ftjob-%00"),
            ("GET", "/v1/fine_tuning/jobs/ftjob-x/events?after=ftevent-99999999999999999999999"),
        ):
            answer = h.request(method, path)
            if answer.status_code not in (400, 404, 422):
                problems.append((method, path, answer.status_code, answer.text[:200]))
    admin = [
        (f"/v1/admin/accounts/{HUGE}/credit", {"credits": "1"}),
        (f"/v1/admin/accounts/{account}/credit", {"credits": "1e30"}),
        (f"/v1/admin/accounts/{account}/credit", {"credits": "Infinity"}),
    ]
    for path, payload in admin:
        answer = httpx.post(f"{api.url}{path}", json=payload, headers=ADMIN)
        if answer.status_code not in (400, 404, 422):
            problems.append((path, payload, answer.status_code, answer.text[:200]))
    assert problems == []


def test_a_temperature_that_would_make_nan_probabilities_is_a_400(api, market):
    """Before: temperature 1e-300 divided the logits to infinity; the sampler's NaN became a retryable 503, which
    the official client retried."""
    _, headers = admin_customer(api)
    httpx.post(f"{api.url}/v1/admin/accounts/{_account_id(api, headers)}/credit", json={"credits": "1"}, headers=ADMIN)
    body = {"model": market.model, "prompt": "x", "max_tokens": 2, "temperature": 1e-300}
    answer = httpx.post(f"{api.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "temperature"
    greedy = httpx.post(f"{api.url}/v1/completions", json={**body, "temperature": 0}, headers=headers, timeout=120)
    assert greedy.status_code == 200, greedy.text


# ---------------------------------------------------------------------------------------------------- operators
def test_operator_endpoints_answer_only_to_the_admin_or_the_node_itself(api, market):
    """Before: anyone could read any node's receipts, earnings, settlements and reputation, and the market series."""
    customer = new_customer(api, credits="1")
    customer.openai().completions.create(model=market.model, prompt="records", max_tokens=2, temperature=0)
    nodes = {n.name: n.eth_address for n in market.swarm.nodes}
    alpha, beta = nodes["alpha"], nodes["beta"]
    key = node_key(market, "alpha")
    path = f"/v1/nodes/{alpha}/receipts"
    wait_for(lambda: httpx.get(f"{api.url}{path}", headers=ADMIN).status_code == 200, 60, "the ledger to know the node")
    assert httpx.get(f"{api.url}{path}").status_code == 401
    assert httpx.get(f"{api.url}{path}", headers={"Authorization": f"Bearer {customer.key}"}).status_code == 401
    signed = signed_for(api.url, key, "GET", path)
    own = httpx.get(f"{api.url}{path}", headers=signed)
    assert own.status_code == 200 and own.json()["address"].lower() == alpha.lower()
    replay = httpx.get(f"{api.url}{path}", headers=signed)
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "replayed"
    other = f"/v1/nodes/{beta}/earnings"
    assert httpx.get(f"{api.url}{other}", headers=signed_for(api.url, key, "GET", other)).status_code == 403
    moved = signed_for(api.url, key, "GET", f"/v1/nodes/{alpha}/earnings")  # signed for another path
    assert httpx.get(f"{api.url}{path}", headers=moved).status_code == 401
    stale = signed_for(api.url, key, "GET", path, now=time.time() - 3 * MAX_SKEW)
    assert httpx.get(f"{api.url}{path}", headers=stale).status_code == 401
    stats = "/v1/market/stats?window=600&bucket=60"
    assert httpx.get(f"{api.url}{stats}").status_code == 401
    assert httpx.get(f"{api.url}{stats}", headers=ADMIN).status_code == 200
    assert httpx.get(f"{api.url}{stats}", headers=signed_for(api.url, key, "GET", stats)).status_code == 200
    from eth_account import Account

    stranger = Account.create().key.hex()
    assert httpx.get(f"{api.url}{stats}", headers=signed_for(api.url, stranger, "GET", stats)).status_code == 403
    # the operator's CLI signs with the node's key folder
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "nectar.cli",
            "operator",
            "records",
            "--key-dir",
            str(market.swarm.workdir / "keys" / "alpha"),
            "--api-url",
            api.url,
            "--what",
            "receipts",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout[cli.stdout.index("{") :])["address"].lower() == alpha.lower()


# ---------------------------------------------------------------------------------------------------- docs
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_local_assets(api, page):
    """Before: /docs loaded Swagger UI from a CDN (a blank page offline)."""
    html = httpx.get(f"{api.url}{page}")
    assert html.status_code == 200
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""", html.text)
    urls = [a or b for a, b in urls]
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert not re.search(r"https?://(?!127\.0\.0\.1)", html.text.replace(api.url, "")), "an external URL"
    for url in urls:
        assert httpx.get(f"{api.url}{url}").status_code == 200, url
