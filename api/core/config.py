"""The API gateway's one Settings object (environment variables prefixed ``NECTAR_API_``, or a ``.env`` file)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from nectar.service.settings import ServiceSettings, home_sqlite_url

logger = logging.getLogger(__name__)

DEVNET_ADMIN_TOKEN = "nectar-devnet-api-admin"
MICRO = 10**6  # account balances are kept in micro-credits (1e-6 credit) so they fit a 64-bit integer column
WEI_PER_CREDIT = 10**18
WEI_PER_MICRO = WEI_PER_CREDIT // MICRO


def _split_words(value):
    """Lists from the environment may be JSON or space/comma separated (like NECTAR_INITIAL_PEERS)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [word for word in text.replace(",", " ").split() if word]
    return value


class Settings(ServiceSettings):
    """Everything the API process and its fine-tuning worker read; built once per process (``get_settings``)."""

    model_config = SettingsConfigDict(env_prefix="NECTAR_API_", env_file=".env", extra="ignore")
    DEVNET_SECRETS: ClassVar[dict[str, str]] = {"admin_token": DEVNET_ADMIN_TOKEN}
    OWN_KEYS: ClassVar[tuple[str, ...]] = ("private_key",)

    # the shared fields (ServiceSettings), with the API's defaults
    port: int = 8800
    database_url: str = Field(default_factory=lambda: home_sqlite_url("api.db"))
    broker_url: str = Field(default_factory=lambda: home_sqlite_url("api-broker.db", scheme="sqla+sqlite"))
    admin_token: str = DEVNET_ADMIN_TOKEN  # bearer token for /v1/admin/* (and account creation without signup)

    public_url: str | None = None  # how users reach the API (shown in examples); default http://host:port
    ledger_url: str | None = None  # the ledger service (node receipts, earnings, settlements, reputation)

    # the swarm
    models: Annotated[list[str], NoDecode] = ["smollm2-135m"]  # built-in names, checkpoint folders or Hub ids
    # (org/name, org/name@revision; HF_TOKEN for gated ones) to serve
    initial_peers: Annotated[list[str], NoDecode] = []  # default: NECTAR_INITIAL_PEERS
    private_key: str | None = None  # the gateway's wallet (signs vouchers, owns the escrow); devnet: a demo client
    step_timeout: float = 30.0  # s, one inference step at one hop
    max_concurrent_generations: int = 8  # generations running at once per served model, each its own swarm
    # session: the nodes batch their steps into one forward per round. A gateway is one client to the nodes, which
    # hold at most --client-max-sessions (8 by default) sessions of one client each: raise both together
    max_queued_generations: int = 64  # requests waiting for a generation slot per model; past that, 503 + Retry-After
    tuned_cache_size: int = 4  # fine-tuned prompt sets kept loaded
    head_device: str = "cpu"  # where the gateway's embeddings and LM head compute ("cuda" on a GPU host: every token
    # of every session reads the whole head, which bounds a CPU gateway at about memory bandwidth / head size)

    # pricing and credit
    # a request costs what its route's nodes charge (their price x blocks x the tokens each computed, n rows, soft
    # prompts and failover replays included) x (1 + price_margin), rounded up to a micro-credit (docs/economics.md)
    price_margin: float = 0.2  # the operator's share on top of what the nodes charge (0.2 = 20%)
    max_route_price: int = 10**15  # credit wei per token through every block of a model: dearer routes are not taken
    # (a request then gets 503); 0 = no cap
    failover_reserve: float = 0.5  # share of a request's worst case added to its hold and budget for failover
    # replays (a replay re-sends a span's history to the new node); past it, the generation stops ("length")
    price_per_token: int = 10  # micro-credits per prompt or completion token charged at least (the gateway's own costs
    # where nodes are free or cheap), and the price of fine-tuning tokens
    faucet_credits: Decimal = Decimal(10)  # credits one devnet faucet call adds to an account
    deposit_poll_seconds: float = 5.0  # how often the chain is scanned for deposits to the gateway's escrow
    deposit_confirmations: int = 0  # blocks to wait before crediting a deposit (0 on a devnet)
    hold_timeout_seconds: float = 3600.0  # a hold left by a crashed request is released after this
    reserve_per_node: int = 10**18  # credit wei of the gateway's escrow kept reserved for each node it may route to
    # (Escrow.reserve, topped up at each chain scan): nodes with a ledger extend credit only against settled payments
    # and such a reserve, beyond their own small unbacked limit (issue 20); 0 = reserve nothing
    reserve_max_nodes: int = 20  # reserve for at most this many nodes, the ledger's best ranked first

    # requests and abuse limits
    allow_signup: bool | None = None  # anyone may POST /v1/accounts; default: only on a devnet (else the admin token)
    rate_limit_per_minute: int = 600  # per-key request limit: the default and the most a key may have
    max_keys_per_account: int = 20  # unrevoked API keys one account may hold
    auth_failures_per_minute: int = 20  # failed authentications per client address before 429
    signups_per_hour: int = 10  # accounts created per client address (open sign-up; the admin token is exempt)
    trusted_proxies: Annotated[list[str], NoDecode] = []  # addresses/CIDRs of reverse proxies whose
    # X-Forwarded-For names the client; from anyone else the header is ignored (it would let a caller pick its address)
    rate_limit_url: str | None = None  # redis://... shares limits across API processes; default: in-process
    default_max_tokens: int = 256  # chat completions without max_tokens
    max_request_bytes: int = 1 * 1024 * 1024
    max_prompts: int = 16  # prompts x n per completion request

    # fine-tuning
    max_file_bytes: int = 2 * 1024 * 1024
    max_training_examples: int = 5000
    fine_tune_pre_seq_len: int = 8  # soft-prompt tokens learned per job (default)
    fine_tune_learning_rate: float = 0.05  # Adam learning rate at learning_rate_multiplier=1
    fine_tune_max_steps: int = 2000

    @field_validator("models", "initial_peers", "trusted_proxies", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_words(value)

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.price_per_token < 0:
            raise ValueError("NECTAR_API_PRICE_PER_TOKEN must be >= 0 (micro-credits per token)")
        if not (0 <= self.price_margin <= 100 and 0 <= self.failover_reserve <= 100):
            raise ValueError("NECTAR_API_PRICE_MARGIN and NECTAR_API_FAILOVER_RESERVE are fractions from 0 to 100")
        if self.max_route_price < 0:
            raise ValueError("NECTAR_API_MAX_ROUTE_PRICE must be >= 0 (credit wei per token; 0 = no cap)")
        if self.reserve_per_node < 0 or self.reserve_max_nodes < 0:
            raise ValueError("NECTAR_API_RESERVE_PER_NODE and NECTAR_API_RESERVE_MAX_NODES must be >= 0")
        for name in ("rate_limit_per_minute", "max_keys_per_account", "auth_failures_per_minute", "signups_per_hour"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.env_name(name)} must be >= 1")
        import ipaddress

        for proxy in self.trusted_proxies:
            ipaddress.ip_network(proxy, strict=False)  # a typo fails at startup, not silently
        if self.max_concurrent_generations < 1:
            raise ValueError("NECTAR_API_MAX_CONCURRENT_GENERATIONS must be >= 1")
        if self.max_queued_generations < 0:
            raise ValueError("NECTAR_API_MAX_QUEUED_GENERATIONS must be >= 0 (0: refuse whenever every slot is busy)")
        return self

    @property
    def signup_open(self) -> bool:
        """Sign-up without the admin token: ``allow_signup`` if set, else only on a devnet."""
        return self.allow_signup if self.allow_signup is not None else self.environment == "devnet"

    @field_validator("head_device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith(("cuda", "mps", "xpu")):
            raise ValueError(
                f"NECTAR_API_HEAD_DEVICE must be cpu or a torch device such as cuda or cuda:1, not {value!r}"
            )
        return value

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def gateway_key(self) -> str | None:
        """The gateway's wallet key; on a devnet without one, the deployment's first demo client account."""
        if self.private_key:
            return self.private_key
        if self.environment != "devnet":
            return None
        try:
            return self.deployment_account_key("client")
        except (OSError, ValueError):
            return None


def credits_to_micro(credits: Decimal | int | str) -> int:
    return int(Decimal(str(credits)) * MICRO)


def micro_to_credits(micro: int) -> str:
    """A decimal string with six places (``"12.345678"``)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), MICRO)
    return f"{sign}{whole}.{frac:06d}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
