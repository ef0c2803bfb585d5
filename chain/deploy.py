"""Deploys the contract set from forge's artifacts with web3.py, wires it, and funds the devnet's demo accounts."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from eth_account import Account
from web3 import Web3

from .accounts import DevAccount
from .artifacts import CONTRACT_NAMES, load_artifact
from .deployment import Deployment

logger = logging.getLogger(__name__)

ETHER = 10**18


@dataclass(frozen=True)
class DeployParams:
    """Contract parameters; the defaults suit a devnet (short delays, open faucet, 1-of-n verifiers). Checked by
    ``check()`` before anything is deployed, so a bad combination fails with a sentence, not a bare revert."""

    faucet_cap: int = 1_000_000 * ETHER  # credits one faucet call may mint; 0 disables it
    unlock_delay: int = 3600  # seconds between a client's withdrawal request and the withdrawal
    min_stake: int = 100 * ETHER  # smallest node stake
    unbond_delay: int = 86_400  # seconds a node waits to take stake back
    fee_bps: int = 100  # protocol fee on settled amounts (1%)
    verifier_threshold: int = 1  # k of the n verifiers needed to open a spot-check slash
    dispute_window: int = 3600  # seconds between k attestations and the slash
    max_evidence_age: int = 43_200  # seconds a receipt stays usable as double-sign evidence
    double_sign_slash_bps: int = 5_000  # share of stake taken for a proven double-sign
    reporter_reward_bps: int = 1_000  # share of that slash paid to the reporter
    spot_check_slash_bps: int = 1_000  # share of stake taken for a failed spot check
    challenge_period: int = 600  # seconds an epoch root stays correctable; only final roots back spot-check cases
    # Spot-check cases citing one epoch. The ledger opens at most one per node per epoch, so this is how many nodes can
    # be charged for one epoch: above the few cheaters an epoch of a devnet-sized swarm could hold, and the most a
    # rogue verifier quorum can freeze (and, unless the arbiter dismisses within the dispute window, slash) per epoch.
    max_cases_per_epoch: int = 16
    demo_credits: int = 100_000 * ETHER  # credits minted to each demo client and node
    settlement_latency: int = 600  # worst-case seconds the ledger takes to settle a voucher (2 epochs + a lease at
    # the ledger's defaults is 240): the unlock delay must exceed it, or clients withdraw before settlement

    def __post_init__(self) -> None:
        if self.unlock_delay <= self.settlement_latency:
            raise ValueError(
                f"unlock_delay ({self.unlock_delay}s) must exceed the ledger's worst-case settlement latency "
                f"(settlement_latency, {self.settlement_latency}s): a client could withdraw its escrow or release a "
                f"reserve before nodes settle its vouchers. Raise unlock_delay (or settle faster and lower "
                f"settlement_latency to match the ledger's 2 x epoch + lease)"
            )


class _Deployer:
    def __init__(self, w3: Web3, private_key: str, chain_id: int):
        self.w3 = w3
        self.account = Account.from_key(private_key)
        self.chain_id = chain_id
        self.nonce = w3.eth.get_transaction_count(self.account.address, "pending")
        self.pending: list[bytes] = []

    def _send(self, tx: dict[str, Any]) -> bytes:
        tx = {**tx, "from": self.account.address, "nonce": self.nonce, "chainId": self.chain_id}
        tx.setdefault("gas", int(self.w3.eth.estimate_gas(tx) * 1.2))
        if "maxFeePerGas" not in tx:
            tx.setdefault("gasPrice", self.w3.eth.gas_price)
        self.nonce += 1
        tx_hash = self.w3.eth.send_raw_transaction(self.account.sign_transaction(tx).raw_transaction)
        self.pending.append(tx_hash)
        return tx_hash

    def deploy(self, name: str, *args: Any) -> str:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        tx_hash = self._send(
            factory.constructor(*args).build_transaction({"from": self.account.address, "nonce": self.nonce})
        )
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
        if receipt["status"] != 1:
            raise RuntimeError(f"deploying {name} reverted (tx 0x{bytes(tx_hash).hex()})")
        logger.info("deployed %s at %s", name, receipt["contractAddress"])
        return receipt["contractAddress"]

    def call(self, contract: Any, fn_name: str, *args: Any) -> None:
        fn = getattr(contract.functions, fn_name)(*args)
        self._send(fn.build_transaction({"from": self.account.address, "nonce": self.nonce}))

    def wait_all(self) -> None:
        for tx_hash in self.pending:
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
            if receipt["status"] != 1:
                raise RuntimeError(f"set-up transaction 0x{bytes(tx_hash).hex()} reverted")
        self.pending.clear()


UNBOND_MARGIN = 3600  # Slashing.UNBOND_MARGIN
MAX_DELAY = 365 * 86_400  # Slashing.MAX_DELAY
MAX_CHALLENGE_PERIOD = 30 * 86_400  # Settlement.MAX_CHALLENGE_PERIOD


def check(params: DeployParams) -> None:
    """Raises ValueError naming what to change when the contracts would refuse ``params`` (or accept a set that
    lets a node escape a slash)."""
    problems = []
    for name in ("double_sign_slash_bps", "reporter_reward_bps", "spot_check_slash_bps"):
        if not 0 <= getattr(params, name) <= 10_000:
            problems.append(f"{name} must be 0..10000 basis points")
    if params.verifier_threshold < 1:
        problems.append("verifier_threshold must be at least 1")
    if params.max_cases_per_epoch < 1:
        problems.append("max_cases_per_epoch must be at least 1")
    if not 0 < params.max_evidence_age <= MAX_DELAY or not 0 <= params.dispute_window <= MAX_DELAY:
        problems.append(f"max_evidence_age must be 1..{MAX_DELAY} s and dispute_window 0..{MAX_DELAY} s")
    if not 0 <= params.challenge_period <= MAX_CHALLENGE_PERIOD:
        problems.append(f"challenge_period must be 0..{MAX_CHALLENGE_PERIOD} s")
    minimum = params.max_evidence_age + params.dispute_window + UNBOND_MARGIN
    if params.unbond_delay <= minimum:
        problems.append(
            f"unbond_delay ({params.unbond_delay} s) must exceed max_evidence_age + dispute_window + {UNBOND_MARGIN} s "
            f"({minimum} s), or a node could unbond before a slash reaches it"
        )
    if params.challenge_period + UNBOND_MARGIN > params.max_evidence_age:
        problems.append(
            f"challenge_period ({params.challenge_period} s) + {UNBOND_MARGIN} s must not exceed max_evidence_age "
            f"({params.max_evidence_age} s): an epoch root must stay citable for a while after it becomes final"
        )
    if problems:
        raise ValueError("bad deployment parameters: " + "; ".join(problems))


def deploy_contracts(
    w3: Web3, *, rpc_url: str, accounts: tuple[DevAccount, ...], params: DeployParams = DeployParams()
) -> Deployment:
    """Deploys Credits, NodeRegistry, Settlement (which is also the Escrow vault) and Slashing, wires them, gives the
    ledger/verifier roles and mints credits to the demo nodes and clients. Returns the Deployment (not yet saved).

    Slashing's two roles are separate keys: the deployer manages verifiers and the threshold, the ``arbiter`` account
    dismisses cases (on a real chain each should be a timelock or a multisig, not a single key)."""
    check(params)
    role = {a.role: a for a in reversed(accounts)}  # first account of each role wins
    deployer, ledger, verifier, treasury = role["deployer"], role["ledger"], role["verifier"], role["treasury"]
    arbiter = role.get("arbiter")
    if arbiter is None or arbiter.address == deployer.address:
        raise ValueError("the accounts need an 'arbiter' distinct from the deployer (Slashing's verifier manager)")
    chain_id = w3.eth.chain_id
    d = _Deployer(w3, deployer.private_key, chain_id)
    start_block = w3.eth.block_number
    owner = deployer.address

    credits = d.deploy("Credits", owner, params.faucet_cap)
    registry = d.deploy("NodeRegistry", credits, params.min_stake, params.unbond_delay, treasury.address, owner)
    settlement = d.deploy(
        "Settlement", credits, params.unlock_delay, owner, treasury.address, params.fee_bps, params.challenge_period
    )
    escrow = settlement  # Settlement is the vault too (Escrow is its base): one address, two ABIs
    slashing = d.deploy(
        "Slashing",
        registry,
        settlement,
        arbiter.address,
        owner,  # verifier manager
        params.verifier_threshold,
        (
            params.double_sign_slash_bps,
            params.reporter_reward_bps,
            params.spot_check_slash_bps,
            params.dispute_window,
            params.max_evidence_age,
            params.max_cases_per_epoch,
        ),
    )
    addresses = dict(zip(CONTRACT_NAMES, (credits, escrow, registry, settlement, slashing)))
    contracts = {n: w3.eth.contract(address=a, abi=load_artifact(n).abi) for n, a in addresses.items()}

    d.call(contracts["NodeRegistry"], "setSlasher", slashing)
    d.call(contracts["Settlement"], "setRootCommitter", ledger.address, True)
    d.call(contracts["Slashing"], "setVerifier", verifier.address, True)
    for account in accounts:
        if account.role in ("node", "client"):
            d.call(contracts["Credits"], "mint", account.address, params.demo_credits)
    d.wait_all()
    logger.info("contracts wired; %d demo accounts funded", sum(a.role in ("node", "client") for a in accounts))

    return Deployment(
        chain_id=chain_id,
        rpc_url=rpc_url,
        contracts={n: {"address": a, "abi": load_artifact(n).abi} for n, a in addresses.items()},
        accounts=[a.to_json() for a in accounts],
        params=asdict(params),
        deployed_at_block=start_block + 1,
    )
