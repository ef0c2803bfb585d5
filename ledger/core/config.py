"""The ledger's one Settings object (environment variables prefixed ``NECTAR_LEDGER_``, or a ``.env`` file)."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from nectar.service.settings import ServiceSettings, home_sqlite_url

logger = logging.getLogger(__name__)

DEVNET_SPOT_CHECK_SECRET = "nectar-devnet-spot-check-secret"
DEVNET_ADMIN_TOKEN = "nectar-devnet-admin"


class Settings(ServiceSettings):
    """Everything the ledger service and its worker read; built once per process (``get_settings``)."""

    model_config = SettingsConfigDict(env_prefix="NECTAR_LEDGER_", env_file=".env", extra="ignore")
    DEVNET_SECRETS: ClassVar[dict[str, str]] = {
        "spot_check_secret": DEVNET_SPOT_CHECK_SECRET,
        "admin_token": DEVNET_ADMIN_TOKEN,
    }
    OWN_KEYS: ClassVar[tuple[str, ...]] = ("operator_key", "verifier_key")

    # the shared fields (ServiceSettings), with the ledger's defaults
    port: int = 8700
    database_url: str = Field(default_factory=lambda: home_sqlite_url("ledger.db"))
    broker_url: str = Field(default_factory=lambda: home_sqlite_url("ledger-broker.db", scheme="sqla+sqlite"))
    admin_token: str = DEVNET_ADMIN_TOKEN  # bearer token for POST /v1/epochs/close

    result_backend: str | None = None  # task results are not needed; set for debugging
    max_batch: int = 5000  # receipts or vouchers per POST
    max_body_bytes: int = 32 * 1024 * 1024
    receipt_max_age_s: float = 43_200.0  # receipts older than this are refused (the chain's maxEvidenceAge, 12 h)
    receipt_max_skew_s: float = 300.0  # receipts dated more than this ahead of the ledger's clock are refused

    operator_key: str | None = None  # commits roots, settles; devnet default: the deployment's "ledger" account
    verifier_key: str | None = None  # attests spot-check failures; devnet default: the "verifier" account
    epoch_seconds: float = 60.0  # beat closes an epoch this often
    settle_batch_size: int = 100  # vouchers per settle() transaction
    epoch_lease_seconds: float = 120.0  # a crashed worker's claim on an epoch expires after this
    exit_poll_seconds: float = 5.0  # beat: how often the worker looks for clients' withdrawal and reserve-release
    # requests on chain and settles their outstanding vouchers at once (before the unlock delay runs out)
    fee_bps: int = 100  # protocol fee in basis points, as the Settlement contract charges (informational here)
    credit_limit: int = 10**16  # credit wei of unpaid work a node grants a client (nodes read it from /v1/config)

    spot_check_fraction: float = 0.01  # q: share of an epoch's receipts re-executed after it closes (docs/economics.md)
    spot_check_gain: float = 100.0  # adaptive rate: a node whose pooled CUSUM stands at S (of threshold H) has its
    # next receipts picked at min(max fraction, q x (1 + gain x S / H)); an honest node's S is ~0 (docs/protocol.md)
    spot_check_max_fraction: float = 0.3  # the adaptive rate's cap per node (bounds the checking work of an epoch)
    spot_check_secret: str = DEVNET_SPOT_CHECK_SECRET  # mixed with the epoch root so nodes cannot predict picks
    spot_check_reputation_penalty: float = 0.5  # each failed spot check multiplies a node's score by this
    reference_stake: int = 10**18  # stake (wei) that earns the full stake component of reputation
    require_stake: bool = True  # refuse vouchers to nodes not registered with the minimum stake (the stake gate);
    # skipped while there is no deployment file (then nothing can be settled anyway)
    stake_cache_seconds: float = 10.0  # how old the registry table of GET /v1/stakes may get
    stake_refresh_seconds: float = 30.0  # beat: how often reputation's stake column is re-read from the chain
    chain_read_cache_s: float = 2.0  # GET /v1/backing/{c}/{n} and /v1/stakes/{a}: how long an answer is reused per
    # key (nodes cache backing 10 s anyway); the operator gets a fresh read with ?fresh=true and the admin token
    chain_read_cache_keys: int = 10_000  # answers kept at once (the oldest dropped)
    unregistered_receipts_per_key: int = 1_000  # receipts kept (as evidence only) per key the registry does not know
    unregistered_receipts_total: int = 100_000  # and for all such keys together; past either, new ones are refused
    chain_reads_per_second: float = 20.0  # those routes' chain reads for keys not cached, in all (then 503, retry)
    # reputation inputs nobody can forge (docs/economics.md, "Reputation inputs"): work counts only when the client
    # countersigned it and paid the node on chain or holds a reserve for it (up to that amount); reports likewise
    work_backed_ttl_s: float = 60.0  # how long a chain read of a client's reserve for a node is trusted
    max_clients_per_node: int = 10_000  # client-node rows per node (the least backed gives way)
    max_nodes_per_client: int = 1_000  # client-node rows per client
    max_pending_per_pair: int = 10_000  # countersigned receipts waiting for backing, per client and node
    report_min_backing: int = 10**15  # credit wei a client must have paid a node on chain or reserved, to report on it
    report_burst: float = 3.0  # reports one client may send about one node at once
    report_per_hour: float = 12.0  # and then at this rate
    report_max_age_s: float = 600.0  # a report's timestamp may be this far from the ledger's clock
    audit_source: str | None = None  # "swarm" (nodes' audit RPC) or "module:factory" building the AuditSource
    spot_check_verifier: Literal["local", "swarm"] = "local"  # who re-executes: local spans, or other nodes (RPC)
    swarm_initial_peers: str = ""  # multiaddrs (space/comma separated) the ledger joins the swarm with; default
    # NECTAR_INITIAL_PEERS
    spot_check_rpc_timeout: float = 30.0  # seconds per audit or re-execution RPC
    spot_check_audit_window_s: float = 120.0  # a node unreachable (no answer at all) for this long, retried with
    # backoff, fails its audit; the window is per node and checking run, so an absent node stalls a run this long once
    audit_retention_s: float = 900.0  # nodes must answer audits of a step this long after signing it (published in
    # /v1/config; a node's --audit-retention-s must not be shorter); a later first audit call is the ledger's fault
    slash_poll_seconds: float = 60.0  # beat: how often attested spot-check cases are finalized once their window ends
    models_dir: Path | None = None  # where the local verifier finds converted models (``nectar models``)
    adapters_dir: Path | None = None  # where the local verifier finds LoRA adapter folders (PEFT's, one each) to
    # audit steps computed with them (matched by digest); steps of an adapter not there are not audited

    crash_point: str | None = None  # testing only: a stage name at which the worker pauses so a test can kill it
    crash_marker: str = "/tmp/nectar-ledger-crash"  # testing only: the file (suffixed with the stage) it leaves there

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.environment != "devnet" and self.crash_point:
            raise ValueError("NECTAR_LEDGER_CRASH_POINT is for tests on a devnet only")
        if not 0.0 <= self.spot_check_fraction <= 1.0:
            raise ValueError("NECTAR_LEDGER_SPOT_CHECK_FRACTION must be within [0, 1]")
        if not 0.0 <= self.spot_check_max_fraction <= 1.0 or self.spot_check_gain < 0:
            raise ValueError(
                "NECTAR_LEDGER_SPOT_CHECK_MAX_FRACTION must be within [0, 1] and NECTAR_LEDGER_SPOT_CHECK_GAIN >= 0"
            )
        if not 0 < self.spot_check_audit_window_s < self.audit_retention_s:
            raise ValueError(
                "NECTAR_LEDGER_SPOT_CHECK_AUDIT_WINDOW_S must be positive and below NECTAR_LEDGER_AUDIT_RETENTION_S"
            )
        return self

    @property
    def work_limits(self):
        """The bounds of the work and report book (``crud.WorkLimits``)."""
        from nectar.ledger.crud import WorkLimits

        return WorkLimits(
            backed_ttl_s=self.work_backed_ttl_s,
            max_clients_per_node=self.max_clients_per_node,
            max_nodes_per_client=self.max_nodes_per_client,
            max_pending_per_pair=self.max_pending_per_pair,
            report_min_backing=self.report_min_backing,
            report_burst=self.report_burst,
            report_per_hour=self.report_per_hour,
        )

    @property
    def settlement_latency_s(self) -> float:
        """Worst case from a voucher reaching the ledger to its settlement without the exit watcher: it may just miss
        an epoch's close (one epoch), settle at the next (a second), behind a crashed worker's lease."""
        return 2 * self.epoch_seconds + self.epoch_lease_seconds

    def check_unlock_delay(self, unlock_delay: int) -> None:
        """Refuses a deployment whose unlock delay a client could use to withdraw before this ledger settles."""
        if unlock_delay <= self.settlement_latency_s:
            raise RuntimeError(
                f"the deployment's unlock delay ({unlock_delay}s) does not exceed this ledger's worst-case settlement "
                f"latency (2 x NECTAR_LEDGER_EPOCH_SECONDS + NECTAR_LEDGER_EPOCH_LEASE_SECONDS = "
                f"{self.settlement_latency_s:g}s): clients could withdraw escrow or release reserves before their "
                f"vouchers settle. Shorten the epoch or the lease, or deploy with a longer unlock delay"
            )

    def key_for(self, role: str) -> str:
        """The operator ("ledger") or verifier key; on a devnet, the deployment's demo account with that role."""
        explicit = self.operator_key if role == "ledger" else self.verifier_key
        if explicit:
            return explicit
        try:
            key = self.deployment_account_key(role)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"no {role} key: set NECTAR_LEDGER_{'OPERATOR' if role == 'ledger' else 'VERIFIER'}_KEY "
                f"or start `nectar devnet` (deployment file {self.deployment_path}: {e})"
            ) from None
        if key is None:
            raise RuntimeError(f"the deployment file lists no {role!r} account; set the key explicitly")
        return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
