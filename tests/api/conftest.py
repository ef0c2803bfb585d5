"""API test fixtures.

One market per test package (it is the expensive part): an Anvil devnet, the ledger service and its worker, and a
swarm of two priced nodes ("alpha", "beta") serving a tiny Llama that speaks SmolLM2's tokenizer and chat template.
Each module starts its own `nectar api` against it, once per backend: SQLite + SQLite broker + in-process rate
limits, and PostgreSQL (a fresh database) + Redis broker + Redis rate limits.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from nectar.api.launch import ApiProcess
from tests.api.utils import (
    REDIS_URL,
    NectarProcess,
    free_port,
    make_chat_checkpoint,
    market_api_env,
    wait_for,
)
from tests.ledger.utils import fresh_postgres_url  # one home for throwaway test databases

ADMIN = {"Authorization": "Bearer nectar-devnet-api-admin"}
LEDGER_ADMIN = {"Authorization": "Bearer nectar-devnet-admin"}
ADAPTER = "tone"  # a LoRA adapter of the market's model (tests/api/test_lora_models.py)
NODE_PRICE = 10**9  # credit wei per token per block
GATEWAY_ESCROW = 1000 * 10**18  # the operator's own deposit into the gateway's escrow (pays nodes)
GATEWAY_RESERVE = 10 * 10**18  # of it, reserved for each node before any test (the tests keep reserve_per_node 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the state and log of every API it was talking to: CI keeps nothing else."""
    report = yield
    if report.failed:
        for api in list(ApiProcess.running):
            report.sections.append((f"nectar api {api.url}", api.describe()))
    return report


@dataclass
class Market:
    home: Path
    checkpoint: str
    model: str
    devnet: object
    chain: object
    ledger_url: str
    swarm: object
    gateway_key: str
    gateway: str

    @property
    def peers(self) -> list[str]:
        return self.swarm.initial_peers


@pytest.fixture(scope="package")
def market(tmp_path_factory):
    from nectar.chain import start_devnet
    from nectar.models.tiny import save_tiny_lora
    from nectar.node.local_swarm import LocalSwarm
    from nectar.operator import ensure_registered

    home = tmp_path_factory.mktemp("api-market")
    checkpoint = str(make_chat_checkpoint(home / "tiny-chat"))
    deployment = home / "deployment.json"
    devnet = start_devnet(port=free_port(), state_dir=home / "devnet", deployment_path=deployment)
    processes, swarm = [], None
    try:
        chain = devnet.chain()
        gateway_key = chain.deployment.accounts_with_role("client")[0]["privateKey"]
        chain.deposit(gateway_key, GATEWAY_ESCROW)
        env = {
            "NECTAR_HOME": str(home),
            "NECTAR_DEPLOYMENT": str(deployment),
            "NECTAR_LEDGER_DATABASE_URL": f"sqlite:///{home / 'ledger.db'}",
            "NECTAR_LEDGER_BROKER_URL": f"sqla+sqlite:///{home / 'ledger-broker.db'}",
            "NECTAR_LEDGER_DEPLOYMENT_PATH": str(deployment),
            "NECTAR_LEDGER_EPOCH_SECONDS": "1500",  # closed by hand; under the unlock delay, as the ledger checks
        }
        ledger_port = free_port()
        ledger_url = f"http://127.0.0.1:{ledger_port}"
        ledger = NectarProcess(
            ["ledger", "--port", str(ledger_port), "--log-level", "warning"], env=env, log_path=home / "ledger.log"
        )
        processes.append(ledger)
        wait_for(lambda: _answers(f"{ledger_url}/health") or not ledger.alive(), 60, "the ledger")
        assert ledger.alive(), ledger.log()[-3000:]
        worker = NectarProcess(["worker", "--log-level", "INFO"], env=env, log_path=home / "ledger-worker.log")
        processes.append(worker)
        swarm = LocalSwarm(workdir=home / "swarm", env=env)
        adapter = save_tiny_lora(home / ADAPTER, checkpoint, seed=3)  # served by both nodes: the model <base>:tone
        args = ["--throughput", "100", "--announce-period", "2", "--price", str(NODE_PRICE), "--ledger-url", ledger_url]
        args += ["--adapters", str(adapter)]
        for name, blocks in (("alpha", (0, 2)), ("beta", (2, 4))):  # each registered with the minimum stake
            ensure_registered(chain, swarm.workdir / "keys" / name, funder_key=chain.default_key())
            swarm.add_node(checkpoint, blocks=blocks, name=name, extra_args=args)
        swarm.wait_for_blocks(checkpoint, 4)
        for node in swarm.nodes:  # nodes work only against escrow they checked (issue 22): reserved once, up front
            chain.reserve(gateway_key, node.eth_address, GATEWAY_RESERVE)
        wait_for(lambda: "ready" in worker.log() or not worker.alive(), 90, "the ledger worker")
        assert worker.alive(), worker.log()[-3000:]
        from nectar.models import model_id_of

        yield Market(
            home=home,
            checkpoint=checkpoint,
            model=model_id_of(checkpoint),
            devnet=devnet,
            chain=chain,
            ledger_url=ledger_url,
            swarm=swarm,
            gateway_key=gateway_key,
            gateway=chain.deployment.accounts_with_role("client")[0]["address"],
        )
    finally:
        if swarm is not None:
            swarm.close()
        for process in reversed(processes):
            process.stop()
        devnet.stop()


def node_key(market: Market, name: str) -> str:
    """The private Ethereum key of the market's node ``name`` (its key folder, as `nectar node --name` keeps it)."""
    from nectar.operator import load_node_keys

    return load_node_keys(market.swarm.workdir / "keys" / name).private_key


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Backend:
    name: str
    database_url: str
    broker_url: str
    rate_limit_url: str | None


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request, tmp_path_factory):
    """SQLite + SQLite broker + in-process limits, or PostgreSQL + Redis broker + Redis limits."""
    if request.param == "sqlite":
        home = tmp_path_factory.mktemp("api-sqlite")
        yield Backend("sqlite", f"sqlite:///{home / 'api.db'}", f"sqla+sqlite:///{home / 'api-broker.db'}", None)
        return
    url, drop = fresh_postgres_url("api_test")
    db = uuid.uuid4().int % 12 + 2  # a Redis database of its own, so a stale queue of another run cannot interfere
    broker = f"{REDIS_URL}/{db}"
    import redis

    redis.Redis.from_url(broker).flushdb()
    yield Backend("postgres", url, broker, broker)
    from nectar.service.db import get_engine

    get_engine(url).dispose()
    drop()


@pytest.fixture(scope="module")
def api_environment(market, backend, tmp_path_factory) -> dict:
    return market_api_env(market, backend)


@pytest.fixture(scope="module")
def api(api_environment, backend, tmp_path_factory):
    server = ApiProcess(env=api_environment, log_dir=tmp_path_factory.mktemp(f"api-{backend.name}"))
    yield server
    server.stop()
    if os.environ.get("NECTAR_TEST_SHOW_LOGS"):
        print(server.log()[-5000:])


@dataclass
class Customer:
    """An account with a key, and clients for it."""

    account_id: int
    key: str
    url: str

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120)

    def openai(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, **kwargs)

    def account(self) -> dict:
        with self.http() as h:
            response = h.get("/v1/account")
            assert response.status_code == 200, response.text
            return response.json()

    def usage(self) -> list[dict]:
        with self.http() as h:
            return h.get("/v1/account/usage", params={"limit": 1000}).json()["data"]


def new_customer(api: ApiProcess, *, credits: str | None = None, name: str = "test") -> Customer:
    """A fresh account; ``credits`` granted by the operator (admin token) when given."""
    with httpx.Client(base_url=api.url, timeout=60) as h:
        created = h.post("/v1/accounts", json={"name": name})
        assert created.status_code == 201, created.text
        body = created.json()
        account_id = int(body["account"]["id"].removeprefix("acct-"))
        if credits is not None:
            granted = h.post(f"/v1/admin/accounts/{account_id}/credit", json={"credits": credits}, headers=ADMIN)
            assert granted.status_code == 200, granted.text
    return Customer(account_id, body["api_key"], api.url)


@pytest.fixture(scope="module")
def tokenizer(market):
    from nectar.models import load_tokenizer

    return load_tokenizer(market.checkpoint)


@pytest.fixture(scope="module")
def reference(market):
    """The same tiny model run locally by transformers: what greedy answers must equal."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(market.checkpoint, dtype=torch.float32).eval()
