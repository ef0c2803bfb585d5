"""Operator signatures are bound to one gateway deployment (issue 24): a node's request signed for gateway A, captured
by A's reader, used to be answered by gateway B of another deployment within the skew window (B's nonce set never saw
it). Each deployment now has an id, made once in its database and public at GET /v1/market/gateway, that the signature
names. Gateway A is the module's `nectar api`; gateway B is a second `nectar api` with its own SQLite database, on the
same swarm and ledger (so it would have answered with the node's records)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from nectar.api.launch import ApiProcess
from nectar.wire.request_auth import GATEWAY_PATH, sign_request
from tests.api.conftest import ADMIN, Backend, new_customer, node_key
from tests.api.utils import market_api_env, signed_for, wait_for
from tests.wire.old_signatures import v1_signed_headers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_gateway(market, tmp_path_factory):
    """Gateway B: {"server": its ApiProcess, "env": its environment}; a test may restart it in place."""
    home = tmp_path_factory.mktemp("gateway-b")
    backend = Backend("sqlite", f"sqlite:///{home / 'api.db'}", f"sqla+sqlite:///{home / 'api-broker.db'}", None)
    env = market_api_env(market, backend)
    b = {"server": ApiProcess(env=env, log_dir=home / "logs"), "env": env, "home": home}
    yield b
    b["server"].stop()


def gateway_id(url: str) -> str:
    answer = httpx.get(f"{url}{GATEWAY_PATH}", timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["gateway_id"]


@pytest.fixture(scope="module")
def receipts(api, market, other_gateway):
    """The path of node alpha's receipts, once both gateways answer it (to the admin)."""
    customer = new_customer(api, credits="1")
    customer.openai().completions.create(model=market.model, prompt="records", max_tokens=2, temperature=0)
    alpha = next(n.eth_address for n in market.swarm.nodes if n.name == "alpha")
    path = f"/v1/nodes/{alpha}/receipts"
    for url in (api.url, other_gateway["server"].url):
        wait_for(lambda url=url: httpx.get(f"{url}{path}", headers=ADMIN).status_code == 200, 60, "the node's records")
    return path


def test_a_request_signed_for_one_gateway_is_refused_by_another(api, market, other_gateway, receipts):
    """Before: B answered a request signed for (and already used at) A with the node's records."""
    b = other_gateway["server"]
    a_id, b_id = gateway_id(api.url), gateway_id(b.url)
    key = node_key(market, "alpha")
    signed = sign_request(key, "GET", receipts, gateway=a_id)
    assert httpx.get(f"{api.url}{receipts}", headers=signed).status_code == 200  # A accepts it
    replay = httpx.get(f"{b.url}{receipts}", headers=signed)  # A's reader replays it at B
    assert replay.status_code == 401, replay.text
    error = replay.json()["error"]
    assert error["code"] == "bad_signature" and b_id in error["message"] and "sign anew" in error["message"]
    fresh = sign_request(key, "GET", receipts, gateway=a_id)  # not used at A yet: B's nonce set is not what stops it
    assert httpx.get(f"{b.url}{receipts}", headers=fresh).status_code == 401
    assert httpx.get(f"{api.url}{receipts}", headers=fresh).status_code == 200
    mine = httpx.get(f"{b.url}{receipts}", headers=signed_for(b.url, key, "GET", receipts))  # B's own signers
    assert mine.status_code == 200 and mine.json()["address"].lower() == signed["X-Nectar-Address"].lower()


def test_an_old_format_signature_is_refused_with_how_to_sign_anew(api, market, receipts):
    """Before: the gateway-less v1 text was the format, accepted by every gateway."""
    key = node_key(market, "alpha")
    headers = v1_signed_headers(key, receipts, int(time.time()))
    answer = httpx.get(f"{api.url}{receipts}", headers=headers)
    assert answer.status_code == 401, answer.text
    message = answer.json()["error"]["message"]
    assert "old-format signature" in message and f"GET {GATEWAY_PATH}" in message and "gateway=ID" in message


def test_the_gateway_id_survives_a_restart_and_differs_between_deployments(api, other_gateway):
    a_id, b_id = gateway_id(api.url), gateway_id(other_gateway["server"].url)
    assert re.fullmatch("[0-9a-f]{32}", a_id) and re.fullmatch("[0-9a-f]{32}", b_id)
    assert a_id != b_id
    other_gateway["server"].stop()
    other_gateway["server"] = ApiProcess(env=other_gateway["env"], log_dir=other_gateway["home"] / "logs-restarted")
    assert gateway_id(other_gateway["server"].url) == b_id  # the same database: the same deployment
