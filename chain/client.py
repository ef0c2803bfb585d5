"""``Chain``: every contract call the rest of Nectar makes (deposits, staking, settlement, epoch roots, slashing,
and the event queries the ledger and API watch)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3

from .deployment import Deployment, load_deployment
from .encoding import (
    as_bytes32,
    as_signature,
    decode_settle_batch,
    encode_settle_batch,
    receipt_tuple,
    voucher_fields,
)
from .errors import ChainError, ErrorDecoder
from .tx import EventDecoder, Transactor, TxResult

logger = logging.getLogger(__name__)

_PERMIT_TYPES = {
    "Permit": [
        {"name": "owner", "type": "address"},
        {"name": "spender", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ]
}


def _address(value: str) -> str:
    return Web3.to_checksum_address(value)


def _key_address(private_key: str | bytes) -> str:
    return Account.from_key(private_key).address


# Settlement.VoucherSkipped reasons (SKIP_ALREADY_SETTLED, SKIP_INSUFFICIENT_ESCROW, SKIP_PARTLY_PAID: the client's
# free escrow plus its reserve for the node paid only part of the voucher's rise)
SKIP_REASONS = {1: "AlreadySettled", 2: "InsufficientEscrow", 3: "PartlyPaid"}


def _skipped(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``VoucherSkipped`` events of one settle transaction: ``{"index" (batch position), "reason", "client",
    "node", "channelId"}``."""
    return [
        {
            "index": int(e["args"]["index"]),
            "reason": SKIP_REASONS.get(int(e["args"]["reason"]), f"reason {e['args']['reason']}"),
            "client": e["args"]["client"],
            "node": e["args"]["node"],
            "channelId": int(e["args"]["channelId"]),
        }
        for e in events
        if e["event"] == "VoucherSkipped"
    ]


class Chain:
    """A connection to one Nectar deployment. Writes take the sender's private key (kept local, transactions are
    signed here); reads are free. Reverts raise ``ChainError`` whose message starts with the custom error's name.

    :param deployment: where the contracts are (see ``load_deployment``)
    :param rpc_url: overrides the deployment's RPC URL (e.g. another host's view of the same chain)
    """

    def __init__(self, deployment: Deployment, *, rpc_url: str | None = None, timeout: float = 60.0):
        self.deployment = deployment
        self.rpc_url = rpc_url or deployment.rpc_url
        self.w3 = Web3(Web3.HTTPProvider(self.rpc_url, request_kwargs={"timeout": timeout}))
        self.chain_id = deployment.chain_id
        self.contracts = {
            name: self.w3.eth.contract(address=_address(info["address"]), abi=info["abi"])
            for name, info in deployment.contracts.items()
        }
        self._events = EventDecoder(self.contracts)
        self._tx = Transactor(
            self.w3,
            chain_id=self.chain_id,
            errors=ErrorDecoder(info["abi"] for info in deployment.contracts.values()),
            events=self._events,
        )
        self.credits = self.contracts["Credits"]
        self.escrow = self.contracts["Escrow"]
        self.registry = self.contracts["NodeRegistry"]
        self.settlement = self.contracts["Settlement"]
        self.slashing = self.contracts["Slashing"]
        # The Receipt struct's fields, in order, as the compiled contract declares them.
        self._receipt_fields = next(
            item["inputs"][0]["components"]
            for item in deployment.abi_of("Settlement")
            if item.get("name") == "receiptDigest"
        )

    @classmethod
    def from_deployment(cls, path: Path | str | None = None, **kwargs: Any) -> Chain:
        return cls(load_deployment(path), **kwargs)

    def __repr__(self) -> str:
        return f"Chain(chain_id={self.chain_id}, rpc_url={self.rpc_url!r})"

    # ------------------------------------------------------------------ basics

    def address_of(self, name: str) -> str:
        return self.deployment.address_of(name)

    def eip712_domain(self) -> dict[str, Any]:
        """The domain receipts and vouchers are signed under."""
        return {
            "name": "Nectar",
            "version": "1",
            "chainId": self.chain_id,
            "verifyingContract": self.address_of("Settlement"),
        }

    def block_number(self) -> int:
        return self.w3.eth.block_number

    def is_connected(self) -> bool:
        try:
            return self.w3.eth.chain_id == self.chain_id
        except Exception:  # connection refused, timeout: the caller only wants a yes/no
            return False

    def default_key(self, role: str = "deployer") -> str:
        """Private key of the first devnet demo account with ``role`` (devnets only)."""
        accounts = self.deployment.accounts_with_role(role)
        if not accounts:
            raise ChainError(f"the deployment lists no {role!r} account; pass a private key explicitly")
        return accounts[0]["privateKey"]

    def advance_time(self, seconds: int) -> None:
        """Devnet only: moves the chain clock forward and mines a block (unlock delays, dispute windows)."""
        self.w3.provider.make_request("evm_increaseTime", [int(seconds)])
        self.w3.provider.make_request("evm_mine", [])

    def eth_balance(self, address: str) -> int:
        return self.w3.eth.get_balance(_address(address))

    def send_eth(self, private_key: str, to: str, value: int) -> TxResult:
        return self._tx.send_value(private_key, to, value)

    # ------------------------------------------------------------------ credits

    def faucet(self, to: str, amount: int, *, private_key: str | None = None) -> TxResult:
        """Mints devnet credits to ``to`` (sent from ``private_key`` or the deployer demo account)."""
        key = private_key or self.default_key()
        return self._tx.send(key, self.credits.functions.faucet(_address(to), int(amount)), context="faucet")

    def credit_balance(self, address: str) -> int:
        return self.credits.functions.balanceOf(_address(address)).call()

    def approve(self, private_key: str, spender: str, amount: int) -> TxResult:
        fn = self.credits.functions.approve(_address(spender), int(amount))
        return self._tx.send(private_key, fn, context="approve")

    def _permit(self, private_key: str, spender: str, amount: int, deadline: int):
        owner = _key_address(private_key)
        message = {
            "types": _PERMIT_TYPES,
            "primaryType": "Permit",
            "domain": {
                "name": "Nectar Credits",
                "version": "1",
                "chainId": self.chain_id,
                "verifyingContract": self.address_of("Credits"),
            },
            "message": {
                "owner": owner,
                "spender": _address(spender),
                "value": int(amount),
                "nonce": self.credits.functions.nonces(owner).call(),
                "deadline": deadline,
            },
        }
        return Account.sign_typed_data(private_key, full_message=message)

    # ------------------------------------------------------------------ escrow

    def deposit(self, private_key: str, amount: int) -> TxResult:
        """Deposits ``amount`` credits into the sender's escrow in one transaction (EIP-2612 permit + deposit)."""
        deadline = self.w3.eth.get_block("latest")["timestamp"] + 3600
        sig = self._permit(private_key, self.address_of("Escrow"), amount, deadline)
        fn = self.escrow.functions.depositWithPermit(
            int(amount), deadline, sig.v, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")
        )
        return self._tx.send(private_key, fn, context="deposit")

    def request_withdrawal(self, private_key: str, amount: int) -> TxResult:
        fn = self.escrow.functions.requestWithdrawal(int(amount))
        return self._tx.send(private_key, fn, context="request_withdrawal")

    def withdraw(self, private_key: str) -> TxResult:
        return self._tx.send(private_key, self.escrow.functions.withdraw(), context="withdraw")

    def escrow_balance(self, client: str) -> int:
        return self.escrow.functions.balanceOf(_address(client)).call()

    def pending_withdrawal(self, client: str) -> tuple[int, int]:
        """(amount, unlock timestamp) of the client's open withdrawal request; zeros if none."""
        amount, unlock_at = self.escrow.functions.pendingWithdrawal(_address(client)).call()
        return amount, unlock_at

    def reserve(self, private_key: str, node: str, amount: int) -> TxResult:
        """Moves ``amount`` of the sender's free escrow into its reserve for ``node``: only vouchers to ``node`` can
        draw on it (after the free balance), and it leaves only through ``request_reserve_release`` + the unlock
        delay, so ``node`` can serve against it without trusting the sender."""
        fn = self.escrow.functions.reserve(_address(node), int(amount))
        return self._tx.send(private_key, fn, context="reserve")

    def request_reserve_release(self, private_key: str, node: str, amount: int) -> TxResult:
        """Asks to release ``amount`` of the sender's reserve for ``node``; ``release_reserve`` after the unlock delay
        (the node's ledger settles the sender's vouchers meanwhile)."""
        fn = self.escrow.functions.requestReserveRelease(_address(node), int(amount))
        return self._tx.send(private_key, fn, context="request_reserve_release")

    def release_reserve(self, private_key: str, node: str) -> TxResult:
        """Returns what is left of a requested release to the sender's free escrow balance."""
        return self._tx.send(
            private_key, self.escrow.functions.releaseReserve(_address(node)), context="release_reserve"
        )

    def reserve_of(self, client: str, node: str) -> dict[str, int]:
        """``client``'s reserve for ``node``: {"amount" (drawable for node's vouchers), "pendingRelease" (of an open
        release request, still drawable until released), "releaseAt" (0 if none)}."""
        amount, pending, release_at = self.escrow.functions.reserveOf(_address(client), _address(node)).call()
        return {"amount": int(amount), "pendingRelease": int(pending), "releaseAt": int(release_at)}

    def unlock_delay(self) -> int:
        """Seconds between a withdrawal (or reserve release) request and its execution."""
        return int(self.escrow.functions.unlockDelay().call())

    # ------------------------------------------------------------------ node registry

    def register_node(self, private_key: str, peer_id: str, stake: int) -> TxResult:
        """Approves (if needed) and registers the sender as a node with its P2P peer id and ``stake`` credits."""
        registry = self.address_of("NodeRegistry")
        owner = _key_address(private_key)
        if self.credits.functions.allowance(owner, registry).call() < stake:
            self.approve(private_key, registry, stake)
        fn = self.registry.functions.register(peer_id, int(stake))
        return self._tx.send(private_key, fn, context="register_node")

    def add_stake(self, private_key: str, amount: int) -> TxResult:
        registry = self.address_of("NodeRegistry")
        if self.credits.functions.allowance(_key_address(private_key), registry).call() < amount:
            self.approve(private_key, registry, amount)
        return self._tx.send(private_key, self.registry.functions.addStake(int(amount)), context="add_stake")

    def set_peer_id(self, private_key: str, peer_id: str) -> TxResult:
        return self._tx.send(private_key, self.registry.functions.setPeerId(peer_id), context="set_peer_id")

    def request_unbond(self, private_key: str, amount: int) -> TxResult:
        fn = self.registry.functions.requestUnbond(int(amount))
        return self._tx.send(private_key, fn, context="request_unbond")

    def unbond(self, private_key: str) -> TxResult:
        return self._tx.send(private_key, self.registry.functions.unbond(), context="unbond")

    def stake_of(self, node: str) -> int:
        """Bonded (active) stake."""
        return self.registry.functions.stakeOf(_address(node)).call()

    def node_info(self, node: str) -> dict[str, Any]:
        registered, peer_id, bonded, unbonding, unlock_at = self.registry.functions.nodeInfo(_address(node)).call()
        return {
            "registered": registered,
            "peerId": peer_id,
            "bonded": bonded,
            "unbonding": unbonding,
            "unlockAt": unlock_at,
        }

    def registered_nodes(self) -> list[dict[str, Any]]:
        """Every node that ever registered, with its current info."""
        count = self.registry.functions.nodeCount().call()
        nodes = [self.registry.functions.nodeList(i).call() for i in range(count)]
        return [{"node": n, **self.node_info(n)} for n in nodes]

    # ------------------------------------------------------------------ settlement

    def settle(self, private_key: str, vouchers: Sequence[tuple[Any, Any]]) -> TxResult:
        """Settles (voucher, 65-byte signature) pairs in one transaction. Vouchers are protocol dicts (client, node,
        channelId, cumulativeAmount) or nectar.wire Vouchers.

        A voucher whose channel is already paid at or above its amount (replayed, or front-run by someone who
        settled it first) or that the client's escrow no longer covers is skipped by the contract, not reverted:
        the transaction succeeds and ``result.skipped`` lists ``{"voucher": index in vouchers, "reason":
        "AlreadySettled" | "InsufficientEscrow" | "PartlyPaid", "client", "node", "channelId"}`` for each, read from
        the receipt's ``VoucherSkipped`` events. What the free escrow does not cover is drawn from the client's
        reserve for the voucher's node; "PartlyPaid": both together paid only part of the rise (``paid`` tells how
        much), the rest stays due. A malformed voucher still reverts the batch: ``ChainError`` (InvalidSignature,
        BadNodeIndex) whose ``error_args["voucher"]`` is its index in ``vouchers``."""
        batch = encode_settle_batch(vouchers)
        fn = self.settlement.functions.settle(batch.nodes, batch.groups)
        try:
            result = self._tx.send(private_key, fn, context=f"settle({len(vouchers)} vouchers)", access_list=True)
        except ChainError as exc:
            position = exc.error_args.get("index")
            if isinstance(position, int) and position < len(batch.order):
                exc.error_args["voucher"] = batch.order[position]
                exc.args = (f"{exc.args[0]} (voucher {batch.order[position]} of the list given)",)
            raise
        result.skipped = [{**skip, "voucher": batch.order[skip["index"]]} for skip in _skipped(result.events)]
        for skip in result.skipped:
            logger.warning(
                f"settle: voucher {skip['voucher']} ({skip['client']} -> {skip['node']} #{skip['channelId']}) "
                f"skipped: {skip['reason']}"
            )
        return result

    def paid(self, client: str, node: str, channel_id: int, partner: str | None = None) -> int:
        """Cumulative amount already settled on a channel (``partner`` None: the node itself, as in vouchers)."""
        return self.settlement.functions.paid(
            _address(client), _address(node), _address(partner or node), int(channel_id)
        ).call()

    def node_balance(self, node: str) -> int:
        """Settled, unwithdrawn earnings of a node (or of the fee recipient)."""
        return self.escrow.functions.earningsOf(_address(node)).call()

    def withdraw_earnings(self, private_key: str) -> TxResult:
        return self._tx.send(private_key, self.escrow.functions.withdrawEarnings(), context="withdraw_earnings")

    def voucher_digest(self, voucher: Any) -> bytes:
        """The EIP-712 digest as the contract computes it (cross-check for off-chain signers)."""
        v = voucher_fields(voucher)
        return bytes(
            self.settlement.functions.voucherDigest(
                v.client, v.node, v.partner, v.channel_id, v.cumulative_amount
            ).call()
        )

    def _receipt(self, receipt: Any) -> tuple:
        return receipt_tuple(receipt, self._receipt_fields)

    def receipt_digest(self, receipt: Any) -> bytes:
        return bytes(self.settlement.functions.receiptDigest(self._receipt(receipt)).call())

    def receipt_leaf(self, receipt: Any) -> bytes:
        return bytes(self.settlement.functions.receiptLeaf(self._receipt(receipt)).call())

    # ------------------------------------------------------------------ epoch roots

    def commit_epoch_root(self, private_key: str, epoch: int, root: bytes, count: int) -> TxResult:
        """Root committers only: records ``epoch``'s root. Epochs go in order (``latest_epoch() + 1``); an epoch
        without receipts is committed as (32 zero bytes, 0)."""
        fn = self.settlement.functions.commitEpochRoot(int(epoch), as_bytes32(root), int(count))
        return self._tx.send(private_key, fn, context=f"commit_epoch_root({epoch})")

    def correct_epoch_root(self, private_key: str, epoch: int, root: bytes, count: int) -> TxResult:
        """Root committers only: replaces a committed root before its challenge period ends (``EpochRootFinal``
        after)."""
        fn = self.settlement.functions.correctEpochRoot(int(epoch), as_bytes32(root), int(count))
        return self._tx.send(private_key, fn, context=f"correct_epoch_root({epoch})")

    def latest_epoch(self) -> int:
        """The last committed epoch (0: none); the next commit must be this + 1."""
        return int(self.settlement.functions.latestEpoch().call())

    def challenge_period(self) -> int:
        """Seconds after its first commit that an epoch root stays correctable (and cannot back a case)."""
        return int(self.settlement.functions.challengePeriod().call())

    def epoch_root(self, epoch: int) -> bytes:
        """The committed root of ``epoch``; 32 zero bytes when none was committed (or the epoch was empty)."""
        root, _count, _at = self.settlement.functions.epochRoot(int(epoch)).call()
        return bytes(root)

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        """``{"root", "count", "committedAt" (0: never committed), "finalAt" (0: never committed)}``."""
        root, count, at = self.settlement.functions.epochRoot(int(epoch)).call()
        final_at = int(self.settlement.functions.epochFinalAt(int(epoch)).call())
        return {"root": bytes(root), "count": count, "committedAt": at, "finalAt": final_at}

    def chain_time(self) -> int:
        """The latest block's timestamp (what the contracts compare deadlines with)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def receipt_hash(self, receipt: Any) -> bytes:
        """The receipt's EIP-712 struct hash, hashStruct(receipt), as the contract computes it."""
        return bytes(self.settlement.functions.receiptHash(self._receipt(receipt)).call())

    def verify_inclusion(self, epoch: int, receipt: Any, proof: Sequence[bytes]) -> bool:
        """True when ``receipt`` (a receipt, or its 32-byte struct hash: never its leaf) is in the epoch's committed
        tree; ``proof`` is ``merkle_proof`` over the epoch's leaves. The contract hashes the struct hash into the leaf
        itself, so an inner node of the tree cannot be passed off as a leaf."""
        if isinstance(receipt, (bytes, bytearray)) and len(receipt) == 32:
            receipt_hash = bytes(receipt)
        else:
            receipt_hash = self.receipt_hash(receipt)
        fn = self.settlement.functions.verifyInclusion(int(epoch), receipt_hash, [as_bytes32(p) for p in proof])
        return bool(fn.call())

    # ------------------------------------------------------------------ slashing

    def slash_double_sign(
        self, private_key: str, receipt_a: Any, sig_a: bytes, receipt_b: Any, sig_b: bytes
    ) -> TxResult:
        """Proves two conflicting receipts signed by one node; the sender gets the reporter reward."""
        a, b = self._receipt(receipt_a), self._receipt(receipt_b)
        fn = self.slashing.functions.slashDoubleSign(a, as_signature(sig_a), b, as_signature(sig_b))
        return self._tx.send(private_key, fn, context="slash_double_sign")

    def spot_check_case_id(self, receipt: Any) -> bytes:
        """The id of the spot-check case on ``receipt``: its Merkle leaf (one receipt, one case)."""
        return self.receipt_leaf(receipt)

    def attest_spot_check_failure(
        self,
        private_key: str,
        *,
        epoch: int,
        receipt: Any,
        signature: bytes,
        proof: Sequence[bytes],
        record_hash: bytes,
    ) -> TxResult:
        """A registered verifier attests that ``receipt`` (signed by its node: ``signature``) failed a spot check.
        ``proof`` (``merkle_proof`` over the epoch's leaves) shows it is in ``epoch``'s root, which must be final;
        ``record_hash`` is the hash of the re-execution record. The first attestation opens the case (one per node
        and epoch, at most ``max_cases_per_epoch`` per epoch); k attestations start the dispute window."""
        fn = self.slashing.functions.attestSpotCheckFailure(
            int(epoch),
            self._receipt(receipt),
            as_signature(signature),
            [as_bytes32(p) for p in proof],
            as_bytes32(record_hash),
        )
        return self._tx.send(private_key, fn, context="attest_spot_check_failure")

    def finalize_slash(self, private_key: str, case_id: bytes) -> TxResult:
        """Slashes for spot-check case ``case_id`` (the receipt's leaf) once its dispute window passed; anyone may."""
        fn = self.slashing.functions.finalizeSlash(as_bytes32(case_id))
        return self._tx.send(private_key, fn, context="finalize_slash")

    def dismiss_case(self, private_key: str, case_id: bytes) -> TxResult:
        """The arbiter throws out a spot-check case during its dispute window."""
        fn = self.slashing.functions.dismissCase(as_bytes32(case_id))
        return self._tx.send(private_key, fn, context="dismiss_case")

    def set_verifier(self, private_key: str, verifier: str, allowed: bool = True) -> TxResult:
        """Verifier manager only: adds or removes a spot-check verifier."""
        fn = self.slashing.functions.setVerifier(_address(verifier), bool(allowed))
        return self._tx.send(private_key, fn, context="set_verifier")

    def verifiers(self) -> list[str]:
        """The spot-check verifiers registered now (every ``VerifierUpdated`` address still ``isVerifier``)."""
        events = self.events("Slashing", "VerifierUpdated", from_block=self.deployment.deployed_at_block)
        named = dict.fromkeys(e["args"]["verifier"] for e in events)
        return [a for a in named if self.slashing.functions.isVerifier(a).call()]

    def set_verifier_threshold(self, private_key: str, k: int) -> TxResult:
        """Verifier manager only: k, the attestations a spot-check case needs."""
        return self._tx.send(private_key, self.slashing.functions.setThreshold(int(k)), context="set_threshold")

    def slashing_roles(self) -> dict[str, str]:
        """``{"arbiter", "verifierManager"}``: who dismisses cases, who manages verifiers (never one key)."""
        return {
            "arbiter": self.slashing.functions.arbiter().call(),
            "verifierManager": self.slashing.functions.verifierManager().call(),
        }

    def node_case_in_epoch(self, node: str, epoch: int) -> bytes:
        """The case of ``node`` citing ``epoch`` (32 zero bytes: none; a closed case keeps its place)."""
        return bytes(self.slashing.functions.caseOf(_address(node), int(epoch)).call())

    def verifier_threshold(self) -> int:
        return self.slashing.functions.threshold().call()

    def set_root_committer(self, private_key: str, committer: str, allowed: bool = True) -> TxResult:
        """Settlement's owner only: grants or revokes the right to commit epoch roots."""
        fn = self.settlement.functions.setRootCommitter(_address(committer), bool(allowed))
        return self._tx.send(private_key, fn, context="set_root_committer")

    def spot_check_case(self, case_id: bytes) -> dict[str, Any]:
        """``{"node" (zero address: no case), "attestations", "readyAt", "closed", "epoch", "recordHash"}``."""
        node, attestations, ready_at, closed, epoch, record = self.slashing.functions.caseInfo(
            as_bytes32(case_id)
        ).call()
        return {
            "node": node,
            "attestations": attestations,
            "readyAt": ready_at,
            "closed": closed,
            "epoch": epoch,
            "recordHash": bytes(record),
        }

    # ------------------------------------------------------------------ events

    def events(
        self,
        contract: str,
        event: str,
        *,
        from_block: int = 0,
        to_block: int | str = "latest",
        filters: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Decoded logs of one event, oldest first: ``[{"event", "args", "blockNumber", "txHash", "logIndex"}]``."""
        handle = getattr(self.contracts[contract].events, event)
        logs = handle().get_logs(from_block=from_block, to_block=to_block, argument_filters=filters)
        return [
            {
                "contract": contract,
                "event": event,
                "args": dict(log["args"]),
                "blockNumber": log["blockNumber"],
                "txHash": "0x" + bytes(log["transactionHash"]).hex(),
                "logIndex": log["logIndex"],
            }
            for log in logs
        ]

    def deposits_since(self, block: int, *, client: str | None = None) -> list[dict[str, Any]]:
        """Escrow deposits from ``block`` on: ``[{"client", "amount", "balance", "blockNumber", "txHash", ...}]``."""
        filters = {"client": _address(client)} if client else None
        return [
            {**e["args"], "blockNumber": e["blockNumber"], "txHash": e["txHash"], "logIndex": e["logIndex"]}
            for e in self.events("Escrow", "Deposited", from_block=block, filters=filters)
        ]

    def exit_requests_since(self, block: int, to_block: int | str = "latest") -> list[dict[str, Any]]:
        """Clients asking for escrow back from ``block`` on, oldest first: ``WithdrawalRequested`` (``node`` None) and
        ``ReserveReleaseRequested`` (``node`` set): ``[{"client", "node", "amount", "unlockAt", "blockNumber", ...}]``.
        Nodes' vouchers from these clients must settle before ``unlockAt``."""
        out = [
            {
                **e["args"],
                "node": None,
                "blockNumber": e["blockNumber"],
                "txHash": e["txHash"],
                "logIndex": e["logIndex"],
            }
            for e in self.events("Escrow", "WithdrawalRequested", from_block=block, to_block=to_block)
        ]
        for e in self.events("Escrow", "ReserveReleaseRequested", from_block=block, to_block=to_block):
            args = dict(e["args"])
            args["unlockAt"] = args.pop("releaseAt")
            out.append({**args, "blockNumber": e["blockNumber"], "txHash": e["txHash"], "logIndex": e["logIndex"]})
        return sorted(out, key=lambda e: (e["blockNumber"], e["logIndex"]))

    def settlements_since(self, block: int) -> list[dict[str, Any]]:
        """Settled batches from ``block`` on, each with the vouchers it paid decoded from the transaction's calldata
        (``vouchers``), and those the contract skipped (``skipped``: the ``VoucherSkipped`` events of the
        transaction, each with its ``voucher`` dict and ``reason``)."""
        out = []
        for e in self.events("Settlement", "BatchSettled", from_block=block):
            tx = self.w3.eth.get_transaction(e["txHash"])
            _fn, args = self.settlement.decode_function_input(tx["input"])
            vouchers = decode_settle_batch(args["nodes"], args["groups"])
            receipt = self.w3.eth.get_transaction_receipt(e["txHash"])
            events = [d for d in (self._events.decode(log) for log in receipt["logs"]) if d is not None]
            skipped = {s["index"]: s for s in _skipped(events)}
            out.append(
                {
                    **e["args"],
                    "blockNumber": e["blockNumber"],
                    "txHash": e["txHash"],
                    "vouchers": [v for i, v in enumerate(vouchers) if i not in skipped],
                    "skipped": [{**s, "voucher": vouchers[i]} for i, s in sorted(skipped.items())],
                }
            )
        return out

    def wait_for_block(self, number: int, *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.w3.eth.block_number < number:
            if time.monotonic() > deadline:
                raise TimeoutError(f"block {number} not reached within {timeout}s")
            time.sleep(0.1)
