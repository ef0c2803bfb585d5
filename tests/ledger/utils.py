"""Builders for ledger tests: signed receipts and vouchers from real keys, databases, ledger subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import psycopg2
import torch
from eth_account import Account

from nectar.deployment import domain_from_deployment
from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as R

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def fresh_postgres_url(prefix: str) -> tuple[str, callable]:
    """Create a new empty PostgreSQL database; returns its URL and a function dropping it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(POSTGRES_ADMIN)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    conn.close()

    def drop():
        c = psycopg2.connect(POSTGRES_ADMIN)
        c.autocommit = True
        c.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.close()

    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}", drop


class Party:
    """A key pair (node or client) with helpers to sign receipts / vouchers."""

    def __init__(self, key: str | bytes | None = None):
        self.account = Account.from_key(key) if key else Account.create()
        self.key, self.address = self.account.key, self.account.address


def make_receipt(
    node: Party,
    client: Party,
    *,
    step: int = 0,
    session_id: bytes | None = None,
    tokens: int = 4,
    price: int = 1000,
    output: torch.Tensor | None = None,
    kind: int = 0,
    block_start: int = 0,
    block_end: int = 2,
    timestamp: int | None = None,
    domain: dict | None = None,
    amount: int | None = None,
    model: str = "tiny-llama",
    input_commitment: bytes | None = None,
    descriptor: bytes | None = None,
):
    output = torch.randn(1, tokens, 16) if output is None else output
    fp = fingerprints.ComputeSpec().encode() if descriptor is None else descriptor
    receipt = R.Receipt(
        session_id=session_id or os.urandom(32),
        step=step,
        kind=kind,
        model_id=R.model_id_hash(model),
        block_start=block_start,
        block_end=block_end,
        node=node.address,
        client=client.address,
        tokens=tokens,
        price=price,
        amount=tokens * price if amount is None else amount,
        input_commitment=input_commitment or os.urandom(32),
        output_commitment=fingerprints.commit_tensor(output),
        fingerprint=fingerprints.fingerprint_hash(fp),
        timestamp=timestamp or int(time.time()),
    )
    return eip712.sign_receipt(receipt, node.key, domain or domain_from_deployment()), fp


def receipt_item(signed: R.SignedReceipt, fp: bytes) -> dict:
    return {**signed.to_json(), "fingerprintBytes": "0x" + fp.hex()}


def make_voucher(client: Party, node: Party, amount: int, *, channel: int = 1, domain: dict | None = None):
    return eip712.sign_voucher(
        R.Voucher(client.address, node.address, channel, amount), client.key, domain or domain_from_deployment()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def start_nectar(command: str, args: list[str], env: dict, log_path) -> subprocess.Popen:
    """`nectar <command>` as a real subprocess (its own process group so a test can kill -9 it)."""
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "nectar.cli", command, *args],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
