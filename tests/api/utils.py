"""Builders for API tests: a tiny chat checkpoint, PostgreSQL databases, `nectar api worker` and other nectar
subprocesses (`nectar api` itself starts through ``nectar.api.launch.ApiProcess``), devnet wallets, waiting helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REDIS_URL = "redis://127.0.0.1:6379"


def make_chat_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A tiny random Llama whose vocabulary is SmolLM2's, with SmolLM2's tokenizer and chat template next to it:
    real text and a real chat template at tiny-model speed."""
    from nectar.models import load_tokenizer, resolve_model
    from nectar.models.tiny import save_tiny_checkpoint

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    save_tiny_checkpoint(path, "llama", seed=seed, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class NectarProcess:
    """`python -m nectar.cli <args>` in its own process group, logging to a file."""

    def __init__(self, args: list[str], *, env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nectar.cli", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


class ApiWorker(NectarProcess):
    """`nectar api worker`; returns once Celery says it is ready."""

    def __init__(self, *, env: dict, log_path: Path, timeout: float = 90):
        super().__init__(["api", "worker", "--log-level", "INFO"], env=env, log_path=log_path)
        wait_for(lambda: "ready" in self.log() or not self.alive(), timeout, "the API worker to start")
        if not self.alive():
            raise RuntimeError(f"nectar api worker exited:\n{self.log()[-4000:]}")


def api_env(*, home: Path, database_url: str, broker_url: str, model: str, peers: list[str], **extra) -> dict:
    """The API's environment for tests: ``nectar.api.launch.api_environment`` with a fast deposit scan."""
    from nectar.api.launch import api_environment

    return api_environment(
        home=home,
        model=model,
        initial_peers=peers,
        database_url=database_url,
        broker_url=broker_url,
        deployment_path=home / "deployment.json",
        deposit_poll_seconds=0.5,
        # the market fixture reserves for its nodes once, up front (nodes work only against checked escrow): a
        # reserve taken mid-test would move the gateway's free escrow that funding tests count to the wei
        reserve_per_node=0,
        # the suite creates many accounts and keys from one address, and some keys ask for high limits
        **{"signups_per_hour": 100_000, "rate_limit_per_minute": 100_000, **extra},
    )


def funded_wallet(chain, *, credits: int = 100):
    """A fresh Ethereum account with devnet ETH for gas and ``credits`` Credits (nothing from earlier test runs)."""
    from eth_account import Account

    account = Account.create()
    chain.send_eth(chain.default_key(), account.address, 10**18)
    chain.faucet(account.address, credits * 10**18)
    return account


def deposit_for(chain, account, beneficiary: str, amount: int) -> str:
    """``Escrow.depositFor(beneficiary, amount)`` sent by ``account`` (after approving the escrow); the tx hash."""
    w3 = chain.w3
    chain.approve(account.key, chain.address_of("Escrow"), amount)
    call = chain.escrow.functions.depositFor(beneficiary, amount)
    tx = call.build_transaction(
        {
            "from": account.address,
            "chainId": chain.chain_id,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        }
    )
    sent = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(sent, timeout=30)
    assert receipt["status"] == 1, receipt
    return "0x" + bytes(sent).hex()


def link_signature(account, account_id: int) -> str:
    from eth_account.messages import encode_defunct

    from nectar.api.schemas import link_message

    signed = account.sign_message(encode_defunct(text=link_message(account_id, account.address)))
    return "0x" + bytes(signed.signature).hex()


def signed_for(api_url: str, private_key: str, method: str, path: str, **kwargs) -> dict:
    """Headers of an operator request signed by ``private_key`` for the gateway at ``api_url`` (its id read first)."""
    import httpx

    from nectar.wire.request_auth import GATEWAY_PATH, sign_request

    found = httpx.get(f"{api_url}{GATEWAY_PATH}", timeout=60)
    assert found.status_code == 200, found.text
    return sign_request(private_key, method, path, gateway=found.json()["gateway_id"], **kwargs)


def market_api_env(market, backend, **settings) -> dict:
    """A gateway's environment on the test market and ``backend``, with further Settings fields (``settings``)."""
    extra = {"ledger_url": market.ledger_url}
    if backend.rate_limit_url:
        extra["rate_limit_url"] = backend.rate_limit_url
    return api_env(
        home=market.home,
        database_url=backend.database_url,
        broker_url=backend.broker_url,
        model=market.checkpoint,
        peers=market.peers,
        **settings,
        **extra,
    )
