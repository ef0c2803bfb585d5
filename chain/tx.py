"""Sending transactions with local keys and reading their results: the one place that talks raw web3.

Every revert surfaces as a ``ChainError`` naming the contract's custom error (decoded from any deployed ABI).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError, Web3RPCError

from .errors import ChainError, ErrorDecoder, revert_data

logger = logging.getLogger(__name__)

_GAS_MARGIN = 1.2  # estimate_gas is exact on Anvil; the margin absorbs state drift between estimate and inclusion
_NONCE_RETRIES = 5
_NONCE_CLASHES = ("nonce too low", "already known", "already imported", "replacement transaction underpriced")


@dataclass
class TxResult:
    """A mined, successful transaction: hash, gas used, block, and its decoded events (all Nectar contracts)."""

    tx_hash: str
    gas_used: int
    block_number: int
    events: list[dict[str, Any]] = field(default_factory=list)
    # settle only: the vouchers the contract skipped (VoucherSkipped), see ``Chain.settle``
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


class EventDecoder:
    """Decodes logs emitted by the deployed contracts into ``{"contract", "event", "args", ...}`` dicts."""

    def __init__(self, contracts: dict[str, Any]):
        self._by_address = {c.address.lower(): (name, c) for name, c in contracts.items()}
        self._events: dict[tuple[str, bytes], Any] = {}
        for name, contract in contracts.items():
            for item in contract.abi:
                if item.get("type") == "event" and not item.get("anonymous"):
                    types = ",".join(i["type"] for i in item["inputs"])
                    topic = Web3.keccak(text=f"{item['name']}({types})")
                    self._events[(contract.address.lower(), bytes(topic))] = getattr(contract.events, item["name"])

    def decode(self, log: Any) -> dict[str, Any] | None:
        address = log["address"].lower()
        if address not in self._by_address or not log["topics"]:
            return None
        event = self._events.get((address, bytes(log["topics"][0])))
        if event is None:
            return None
        data = event().process_log(log)
        return {
            "contract": self._by_address[address][0],
            "event": data["event"],
            "args": dict(data["args"]),
            "blockNumber": data["blockNumber"],
            "txHash": "0x" + bytes(data["transactionHash"]).hex(),
            "logIndex": data["logIndex"],
        }


class Transactor:
    """Builds, signs and sends contract calls from local private keys; serializes sends per process so nonces from
    one key never collide."""

    def __init__(self, w3: Web3, *, chain_id: int, errors: ErrorDecoder, events: EventDecoder):
        self.w3 = w3
        self.chain_id = chain_id
        self._errors = errors
        self._events = events
        self._lock = threading.Lock()

    def _raise_from(self, exc: BaseException, context: str) -> None:
        data = revert_data(exc)
        if data:
            raise self._errors.to_error(data, context=context) from exc
        raise ChainError(f"{context} failed: {exc}") from exc

    def call(self, fn: Any, *, context: str) -> Any:
        try:
            return fn.call()
        except (ContractCustomError, ContractLogicError, ContractPanicError, Web3RPCError) as exc:
            self._raise_from(exc, context)

    def send(
        self, private_key: str | bytes, fn: Any, *, context: str, gas: int | None = None, access_list: bool = False
    ) -> TxResult:
        """Signs and sends ``fn`` from ``private_key``'s account and waits for it to be mined.

        :param access_list: attach an EIP-2930 access list from ``eth_createAccessList``: pre-declared storage
            slots cost 100 gas less each, which pays off for transactions touching many cold slots (settle)
        """
        account = Account.from_key(private_key)
        with self._lock:
            params: dict[str, Any] = {
                "from": account.address,
                "chainId": self.chain_id,
                "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
            }
            try:
                if gas is None:
                    params["gas"] = int(fn.estimate_gas({"from": account.address}) * _GAS_MARGIN)
                else:
                    params["gas"] = gas
                tx = fn.build_transaction(params)
                if access_list:
                    found = self.w3.eth.create_access_list({k: tx[k] for k in ("from", "to", "data")})
                    tx["accessList"] = found["accessList"]
            except (ContractCustomError, ContractLogicError, ContractPanicError, Web3RPCError) as exc:
                self._raise_from(exc, context)
            tx_hash = self._broadcast(account, tx)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        if receipt["status"] != 1:
            self._explain_failure(tx, receipt["blockNumber"], context)
        events = [e for e in (self._events.decode(log) for log in receipt["logs"]) if e is not None]
        result = TxResult("0x" + bytes(tx_hash).hex(), receipt["gasUsed"], receipt["blockNumber"], events)
        logger.debug("%s: tx %s gas %d", context, result.tx_hash, result.gas_used)
        return result

    def _broadcast(self, account: Any, tx: dict[str, Any]) -> bytes:
        """Signs and sends ``tx``; when another process using the same key took the nonce first (the ledger's
        service and its worker share one), takes the next free nonce and sends again."""
        for attempt in range(_NONCE_RETRIES):
            try:
                return self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
            except Web3RPCError as exc:
                if attempt == _NONCE_RETRIES - 1 or not any(s in str(exc).lower() for s in _NONCE_CLASHES):
                    raise
                nonce = self.w3.eth.get_transaction_count(account.address, "pending")
                logger.info(
                    "nonce %d of %s was taken (%s); resending with %d",
                    tx["nonce"],
                    account.address,
                    exc,
                    max(nonce, tx["nonce"] + 1),
                )
                tx = {**tx, "nonce": max(nonce, tx["nonce"] + 1)}
        raise AssertionError("unreachable")

    def _explain_failure(self, tx: dict, block: int, context: str) -> None:
        """Replays a mined, failed transaction as a call at its block to recover the revert reason."""
        call = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            self.w3.eth.call(call, block)
        except (ContractCustomError, ContractLogicError, ContractPanicError, Web3RPCError) as exc:
            self._raise_from(exc, context)
        raise ChainError(f"{context}: transaction reverted (out of gas or reverted without data)")

    def send_value(self, private_key: str | bytes, to: str, value: int) -> TxResult:
        """Plain ETH transfer (gas money for fresh accounts)."""
        account = Account.from_key(private_key)
        with self._lock:
            tx = {
                "from": account.address,
                "to": Web3.to_checksum_address(to),
                "value": value,
                "gas": 21_000,
                "gasPrice": self.w3.eth.gas_price,
                "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
                "chainId": self.chain_id,
            }
            tx_hash = self._broadcast(account, tx)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        return TxResult("0x" + bytes(tx_hash).hex(), receipt["gasUsed"], receipt["blockNumber"], [])
