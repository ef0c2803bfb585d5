"""Nectar's own API schemas (accounts, keys, credit, the market); the OpenAI ones live in ``protocol.py``.

Credit amounts are shown twice: ``*_credits`` as decimal strings for people, ``*_micro`` as integers (micro-credits,
the unit accounts are kept in) for programs. On-chain amounts are credit wei, as decimal strings.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from nectar.api.protocol import refuse_nul

logger = logging.getLogger(__name__)

ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
MAX_CREDITS = Decimal(10**9)  # one grant or faucet call: bounded, so micro-credits fit a 64-bit column
RowId = Annotated[int, Field(ge=1, le=2**63 - 1)]  # a path id: a 64-bit column


class RequestModel(BaseModel):
    """Base of Nectar's request bodies: NaN and infinity are refused (every number is bounded)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data):
        refuse_nul(data)
        return data


# SQLite hands timestamps back without a zone; every stored time is UTC
UtcDatetime = Annotated[datetime, AfterValidator(lambda d: d if d.tzinfo else d.replace(tzinfo=UTC))]


def link_message(account_id: int, address: str) -> str:
    """The exact text an address owner signs (EIP-191 personal_sign) to link it to an account."""
    return f"Link {address} to Nectar API account acct-{account_id}"


# ---------------------------------------------------------------------------------------------------- accounts
class AccountCreate(RequestModel):
    """A new account (open on a devnet; otherwise it needs the admin token)."""

    name: str = Field(min_length=1, max_length=120, description="A label for the account.")


class AccountPublic(BaseModel):
    """An account's credit and its funding address."""

    id: str = Field(description="Account id, ``acct-<n>``.")
    name: str = Field(description="The account's label.")
    eth_address: str | None = Field(
        description="Linked address: its deposits to the gateway's escrow fund this account."
    )
    balance_credits: str = Field(description="Spendable credits.")
    balance_micro: int = Field(description="Spendable micro-credits.")
    held_micro: int = Field(description="Micro-credits held by requests in flight.")
    price_per_token_micro: int = Field(
        description="What one prompt or completion token costs at least, in micro-credits (generation is priced from "
        "its route: what the nodes charge plus the operator's margin; see usage.cost)."
    )
    requests: int = Field(description="Metered requests and jobs so far.")
    tokens: int = Field(description="Tokens charged so far.")
    spent_micro: int = Field(description="Micro-credits charged so far.")
    created_at: UtcDatetime = Field(description="When the account was created.")


class ApiKeyCreate(RequestModel):
    """Options of a new API key."""

    name: str = Field(default="", max_length=120, description="A label for the key.")
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Requests per minute (default: the gateway's)."
    )


class ApiKeyPublic(BaseModel):
    """An API key as listed (the secret is shown only once, at creation)."""

    id: int = Field(description="Key id (to revoke it).")
    name: str = Field(description="The key's label.")
    prefix: str = Field(description="The first characters of the key.")
    rate_limit_per_minute: int = Field(description="Requests per minute allowed.")
    created_at: UtcDatetime = Field(description="When the key was created.")
    revoked: bool = Field(description="Whether the key was revoked.")


class ApiKeyCreated(BaseModel):
    """A new key: keep ``api_key``; only its hash is stored."""

    key: ApiKeyPublic = Field(description="The key's listing.")
    api_key: str = Field(description="The secret, ``nk-...``: send it as ``Authorization: Bearer <key>``.")


class AccountCreated(BaseModel):
    """A new account with its first key."""

    account: AccountPublic = Field(description="The account.")
    api_key: str = Field(description="The first key's secret (shown once).")
    key: ApiKeyPublic = Field(description="The first key's listing.")


class AddressLink(RequestModel):
    """Proof that the caller controls an Ethereum address: a personal_sign of ``link_message``."""

    eth_address: str = Field(pattern=ADDRESS_PATTERN, description="The address to link.")
    signature: str = Field(
        pattern=r"^0x[0-9a-fA-F]{130}$",
        description="EIP-191 signature of 'Link <address> to Nectar API account acct-<id>'.",
    )


class FaucetRequest(RequestModel):
    """Devnet faucet options."""

    credits: Decimal | None = Field(
        default=None,
        gt=0,
        le=MAX_CREDITS,
        decimal_places=6,
        description="Credits to add (default and maximum: the gateway's faucet amount).",
    )


class DepositPublic(BaseModel):
    """Credit added to an account."""

    id: int = Field(description="Deposit id.")
    source: str = Field(description="``chain`` (escrow deposit), ``faucet`` (devnet) or ``grant`` (admin).")
    amount_credits: str = Field(description="Credits added.")
    amount_micro: int = Field(description="Micro-credits added.")
    depositor: str | None = Field(description="The address that paid (chain deposits).")
    tx_hash: str | None = Field(description="The transaction (chain and faucet deposits).")
    block_number: int | None = Field(description="Its block.")
    created_at: UtcDatetime = Field(description="When it was credited.")


class DepositList(BaseModel):
    """An account's deposits, newest first."""

    data: list[DepositPublic] = Field(description="The deposits.")


class ScanResultPublic(BaseModel):
    """What a chain scan found, and the caller's account after it."""

    credited: int = Field(description="Deposits credited by this scan (all accounts).")
    unassigned: int = Field(description="Deposits from addresses no account has linked yet.")
    settled_batches: int = Field(description="Settlement batches recorded for the monitor.")
    to_block: int | None = Field(description="Last block scanned.")
    account: AccountPublic = Field(description="The caller's account.")


class FundingInstructions(BaseModel):
    """How to fund an account on chain."""

    gateway_address: str | None = Field(description="Deposit for this address: the gateway's escrow pays nodes.")
    escrow: str | None = Field(description="The Escrow contract.")
    credits_token: str | None = Field(description="The Credits (ERC-20) contract; approve the escrow first.")
    chain_id: int | None = Field(description="Chain id.")
    rpc_url: str | None = Field(description="The chain's RPC URL as the gateway sees it.")
    linked_address: str | None = Field(description="Your linked address (deposits must come from it).")
    steps: list[str] = Field(description="What to do, in order.")
    faucet_available: bool = Field(description="Whether POST /v1/account/faucet works here (devnet).")


class UsagePublic(BaseModel):
    """One metered request or job."""

    reference: str = Field(description="Request or job id.")
    kind: str = Field(description="``completion``, ``chat`` or ``fine_tune``.")
    model: str = Field(description="The model used.")
    prompt_tokens: int = Field(description="Prompt tokens (training tokens for jobs).")
    completion_tokens: int = Field(description="Generated tokens.")
    cost_micro: int = Field(description="Micro-credits charged.")
    created_at: UtcDatetime = Field(description="When it was charged.")


class UsageList(BaseModel):
    """An account's metered requests, newest first."""

    data: list[UsagePublic] = Field(description="The requests.")


class AdminCredit(RequestModel):
    """An operator's grant of credit (promotions, refunds)."""

    credits: Decimal = Field(gt=0, le=MAX_CREDITS, decimal_places=6, description="Credits to add.")
    note: str = Field(default="", max_length=200, description="Why.")


# ---------------------------------------------------------------------------------------------------- market
class SwarmNode(BaseModel):
    """A node of the swarm as announced on the DHT, with its ledger reputation."""

    peer_id: str = Field(description="libp2p peer id.")
    name: str = Field(description="The node's public name.")
    eth_address: str = Field(description="Address that signs its receipts and receives its earnings.")
    model: str = Field(description="The model it serves.")
    block_start: int = Field(description="First block hosted.")
    block_end: int = Field(description="End of the hosted span (exclusive).")
    state: str = Field(description="``online``, ``joining`` or ``offline``.")
    throughput: float = Field(description="Announced tokens/s per block.")
    inference_rps: float = Field(description="Measured decode steps/s through the span.")
    price_per_token: int = Field(description="Credit wei per token per block.")
    cache_tokens_left: int = Field(description="Free KV-cache tokens.")
    reputation: float | None = Field(description="Ledger score in [0, 1] (null without a ledger or history).")
    new: bool | None = Field(description="The ledger has little history of this node.")
    earned_wei: str | None = Field(default=None, description="Receipted earnings known to the ledger.")


class SwarmModelView(BaseModel):
    """One served model: how well its blocks are covered."""

    name: str = Field(description="Model name.")
    num_blocks: int = Field(description="Transformer blocks.")
    coverage: list[int] = Field(description="Online nodes per block.")
    missing_blocks: list[int] = Field(description="Blocks no online node serves.")


class SwarmView(BaseModel):
    """Who hosts what, now."""

    models: list[SwarmModelView] = Field(description="Served models.")
    nodes: list[SwarmNode] = Field(description="Nodes, by model and first block.")
    gateway_address: str | None = Field(description="The gateway's wallet (pays the nodes).")
    ledger_url: str | None = Field(description="The ledger the reputation comes from.")
    generated_at: UtcDatetime = Field(description="When this view was taken.")


class GatewayInfo(BaseModel):
    """Who this gateway is, for signers of operator requests."""

    gateway_id: str = Field(
        description="This deployment's id: a signed operator request names it (nectar.wire.request_auth), and no "
        "other gateway accepts a request signed for it. Fixed for the deployment; read it before signing."
    )


class StatPoint(BaseModel):
    """One time bucket of the market chart."""

    t: UtcDatetime = Field(description="Bucket start.")
    tokens: int = Field(description="Tokens served to API users.")
    spent_micro: int = Field(description="Micro-credits users were charged.")
    settled_credits: float = Field(description="Credits settled on chain to nodes (all clients).")


class MarketStats(BaseModel):
    """Tokens served and credits settled over time."""

    bucket_seconds: int = Field(description="Bucket width.")
    points: list[StatPoint] = Field(description="Buckets, oldest first.")
    total_tokens: int = Field(description="Tokens over the window.")
    total_settled_credits: float = Field(description="Credits settled over the window.")


class NodeReceipt(BaseModel):
    """A receipt a node signed (as stored by the ledger)."""

    leaf: str = Field(description="Merkle leaf of the receipt.")
    session_id: str | None = Field(
        default=None, description="Inference session (private: the ledger shows it to its admin only)."
    )
    step: int = Field(description="Step within the session.")
    kind: int = Field(description="0 inference, 1 forward, 2 backward.")
    client: str = Field(description="Who was served.")
    amount: str = Field(description="Credit wei earned.")
    epoch: int | None = Field(description="Epoch it was committed in (null while collecting).")


class NodeReceipts(BaseModel):
    """A node's receipts."""

    address: str = Field(description="The node.")
    receipts_count: int = Field(description="Receipts stored in total.")
    recent: list[NodeReceipt] = Field(description="The latest receipts.")


class NodeEarnings(BaseModel):
    """What a node earned and what was paid to it."""

    address: str = Field(description="The node.")
    earned_wei: str = Field(description="Sum of its receipts.")
    settled_wei: str = Field(description="Voucher amounts settled on chain for it (gross).")
    withdrawable_wei: str | None = Field(description="Settled, unwithdrawn earnings in the escrow (chain).")


class NodeSettlement(BaseModel):
    """A voucher of a node included in a settlement."""

    epoch: int = Field(description="Epoch that settled it.")
    client: str = Field(description="The paying client.")
    partner: str | None = Field(default=None, description="The node whose channel shares the voucher's storage slot.")
    channel_id: int = Field(description="Voucher channel.")
    cumulative_amount: str = Field(description="Cumulative credit wei of the voucher.")
    status: str = Field(description="``pending``, ``paid`` or ``skipped``.")
    tx_hash: str | None = Field(description="The settle() transaction.")


class NodeSettlements(BaseModel):
    """A node's settled vouchers."""

    address: str = Field(description="The node.")
    settlements: list[NodeSettlement] = Field(description="Newest first.")


class NodeReputation(BaseModel):
    """A node's reputation as the ledger computes it."""

    address: str = Field(description="The node.")
    score: float = Field(description="In [0, 1].")
    new: bool = Field(description="Little history so far.")
    components: dict[str, float] = Field(description="uptime, success, latency, throughput, spot_checks, stake.")
    receipts: int = Field(description="Receipts stored.")
    spot_passed: int = Field(description="Spot checks passed.")
    spot_failed: int = Field(description="Spot checks failed.")
    slashes: int = Field(description="Times slashed.")
    stake: str = Field(description="Bonded stake, credit wei.")
    conflicts: list[dict[str, Any]] = Field(default_factory=list, description="Double-sign evidence against it.")


class Health(BaseModel):
    """Liveness and what the gateway is connected to."""

    status: str = Field(description="``ok``.")
    models: list[str] = Field(description="Served swarm models.")
    database: str = Field(description="Database backend.")
    chain: bool = Field(description="Whether a deployment file is present.")
    ledger: str | None = Field(description="Ledger URL.")
    unknown_fields: int = Field(
        default=0, description="Unknown request fields ignored since start (counted; each name is logged once at most)."
    )
