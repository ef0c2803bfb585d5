"""The node orchestrator: keys, DHT, span selection and loading, RPC handler, announcements and re-balancing."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import threading
import time
from functools import partial
from pathlib import Path

import hivemind
import torch
from hivemind.p2p import PeerID

from nectar.deployment import domain_from_deployment, max_evidence_age_from_deployment
from nectar.models import get_family, load_config, model_id_of, resolve_model, with_revision
from nectar.models.cpu_blas import use_threads
from nectar.models.quant import QUANT_MODES
from nectar.node import trace
from nectar.node.announcer import Announcer
from nectar.node.audit import AuditLog
from nectar.node.audit_auth import AuditGate
from nectar.node.backend import SpanBackend
from nectar.node.block_selection import block_throughputs, choose_best_start, should_move
from nectar.node.config import NodeConfig
from nectar.node.handler import NodeHandler
from nectar.node.identity import (
    ClaimedKeyDir,
    claim_free_key_dir,
    claim_key_dir,
    load_or_create_eth_key,
    load_or_create_p2p_identity,
)
from nectar.node.memory_cache import MemoryCache
from nectar.node.payments import NoPaymentPolicy, PaymentPolicy
from nectar.node.push import lane_owner
from nectar.node.receipts import BackingCache, CreditLedger, FreeAllowance, ReceiptSigner, TrustedClients
from nectar.node.signed_work import EVIDENCE_MARGIN_S, SignedWork
from nectar.node.signing import InlineSigning, SigningWorker
from nectar.node.steps import NodeSteps
from nectar.node.task_pool import ComputeThread
from nectar.paths import nectar_home
from nectar.wire.announce import (
    MAX_ANNOUNCED_CREDIT,
    MAX_PUBLIC_NAME,
    PROTOCOL_VERSION,
    AnnouncementValidator,
    ServerInfo,
    ServerState,
    public_name_valid,
)
from nectar.wire.direct import DirectServer
from nectar.wire.event_loop import new_event_loop
from nectar.wire.fingerprints import ComputeSpec
from nectar.wire.protocol import SUPPORTED_DTYPES
from nectar.wire.reachability import ReachabilityService, ask_peers
from nectar.wire.swarm import is_relayed, read_swarm

logger = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    return "float16" if device.startswith("cuda") else "float32"


def default_batch_wait(device: str) -> float:
    """A GPU round reads the weights once however many sessions it holds, so rounds that split waste whole reads
    (one H100 node, 16 sessions: 1.54x with 0.5, stop 33; a 70B nf4 pair without it: 42.5 tok/s, one node with it
    137, stop 40). A CPU round's cost grows with its rows, and rounds that split let a route's nodes pipeline."""
    return 0.5 if device.startswith("cuda") else 0.0


def default_kv_page_size(device: str) -> int:
    """Pages on a GPU: one recording per round size then serves any sessions, so arrivals and departures record
    nothing (recordings per set of sessions cost ~100 ms each; a paged round equals the own caches' round bit for bit
    on the Triton route, tests/speed/test_triton_route.py, checked on an H100 at stop 47). On a CPU each session keeps
    its own cache: the decode rounds' C attention reads it where it lies."""
    return 16 if device.startswith("cuda") else 0


def announce_maddr(host: str, port: int) -> str:
    """The multiaddr peers dial for ``host`` (an IP address or a DNS name) and ``port``."""
    try:
        return f"/ip{ipaddress.ip_address(host).version}/{host}/tcp/{port}"
    except ValueError:
        return f"/dns4/{host}/tcp/{port}"


def create_dht(
    *,
    host: str,
    port: int,
    initial_peers,
    identity_path: Path | None,
    private_key,
    announce_host: str | None = None,
    client_mode: bool = False,
    relayed: bool = False,
    listen: bool = True,
) -> hivemind.DHT:
    """The node's DHT and P2P daemon. ``relayed``: reachable only through circuit relays, so it looks for a relay at
    once (libp2p's auto-relay) and is a DHT client (peers that cannot dial it must not route DHT queries to it);
    ``listen`` False: no listening port at all (``--reachability relay``). Every peer dials relayed peers and relays
    for them (libp2p's relay service, on by default)."""
    kwargs: dict = dict(use_relay=True)
    if announce_host and port:
        kwargs["announce_maddrs"] = [announce_maddr(announce_host, port)]
    if relayed:
        kwargs.update(use_auto_relay=True, force_reachability="private")
        client_mode = True
        if not listen:
            kwargs["no_listen"] = True
    return hivemind.DHT(
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        identity_path=str(identity_path) if identity_path else None,
        check_if_identity_free=False,
        record_validators=[AnnouncementValidator(private_key)],
        client_mode=client_mode,
        num_workers=4,
        start=True,
        **kwargs,
    )


def visible_addresses(dht: hivemind.DHT) -> list[str]:
    try:
        return [str(addr) for addr in dht.get_visible_maddrs()]
    except ValueError:  # a relayed node before its first relay reservation has none
        return []


RELAY_WAIT = 90.0  # s a relayed node waits for a relay reservation before it announces itself anyway


async def wait_for_relay(p2p, timeout: float = RELAY_WAIT) -> list[str]:
    """This relayed node's circuit addresses once a relay accepted it (libp2p's auto-relay picks among the swarm's
    peers that have a public or DNS address, after seeing a few of them), or [] after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            circuits = [str(a) for a in await p2p.get_visible_maddrs(latest=True) if is_relayed(a)]
        except ValueError:  # no address at all yet
            circuits = []
        if circuits:
            return circuits
        await asyncio.sleep(1.0)
    return []


async def check_reachability(p2p, addresses: list[str], port: int, initial_peers=()) -> bool | None:
    """Asks a few connected peers (the initial ones first) to dial ``addresses`` (``nectar.wire.reachability``), logs
    what they found and what to do about it; True/False, or None when no peer answered."""
    prefer = []
    for address in initial_peers:
        with contextlib.suppress(Exception):  # an address without a valid peer id is just not preferred
            prefer.append(PeerID.from_base58(str(address).rsplit("/p2p/", 1)[1]))
    try:
        found = await ask_peers(p2p, addresses, prefer=prefer, exclude=[p2p.peer_id])
    except Exception as e:
        logger.warning(f"Could not check whether peers can dial this node ({type(e).__name__}: {e})")
        return None
    if found.reachable:
        logger.info(f"Reachable directly at {', '.join(found.at)} ({found.answered} peer(s) dialled this node back)")
    elif found.reachable is False:
        fix = f"open TCP port {port}" if port else "pass a fixed --port (e.g. 31337), open that TCP port"
        logger.warning(
            f"Not reachable from outside (NAT/firewall?): {found.answered} peer(s) could not dial "
            f"{', '.join(addresses) or 'this node'} (they see it at {', '.join(found.seen_from) or '?'}). Serving "
            f"through relays (an extra hop: clients prefer direct nodes). To serve directly, {fix} to this machine "
            "(port forwarding on the router) and pass --announce-host with its public IP or DNS name; "
            "--reachability relay skips this check"
        )
    else:
        logger.warning(
            f"Could not check whether peers can dial this node: none of the {found.asked} peer(s) asked answered. "
            "Serving as if reachable directly; if clients cannot reach it, start with --reachability relay"
        )
    return found.reachable


DEFAULT_NAME = NodeConfig.public_name  # a node left at the default name takes a free identity (node/identity.py)


def claim_identity(config: NodeConfig) -> ClaimedKeyDir:
    """The key folder this node holds for its life: ``--key-dir``, else ``~/.nectar/nodes/<--name>``, else (neither
    given) the first free one of ``~/.nectar/nodes/node``, ``node-2``, ... Raises ``KeyDirInUse`` if a live node holds
    the folder asked for."""
    if config.key_dir:
        return claim_key_dir(config.key_dir, name=config.public_name or DEFAULT_NAME)
    if config.public_name and config.public_name != DEFAULT_NAME:
        return claim_key_dir(nectar_home() / "nodes" / config.public_name, name=config.public_name)
    return claim_free_key_dir(nectar_home() / "nodes", DEFAULT_NAME)


class NotStaked(RuntimeError):
    """This node reports to a ledger but is not registered there with the minimum stake: it would serve unpaid."""


def check_stake(ledger_url: str, address: str, peer_id: str, key_dir: Path, *, timeout: float = 30.0) -> None:
    """Asks the ledger (which reads the chain it settles on) whether ``address`` is registered under ``peer_id``
    with at least the minimum bonded stake; raises ``NotStaked`` naming the command that fixes it."""
    from nectar.wire.ledger_api import LedgerClient, LedgerError

    fix = f"--key-dir {key_dir}"
    deadline = time.monotonic() + timeout
    with LedgerClient(ledger_url, timeout=10.0) as ledger:
        while True:
            try:
                stake = ledger.stake(address)
                break
            except Exception as e:  # the ledger may be starting: retry a little, then refuse
                if time.monotonic() > deadline:
                    status = e.status if isinstance(e, LedgerError) else None
                    raise NotStaked(
                        f"could not check this node's stake with the ledger at {ledger_url} "
                        f"({'status ' + str(status) if status else type(e).__name__}: {e}). Start the ledger (it "
                        "needs the deployment file), or pass --allow-unstaked to serve without pay"
                    ) from None
                time.sleep(1.0)
    problem = stake.problem(peer_id)
    if problem is None:
        logger.info(f"{address} is registered with {stake.bonded} wei bonded (minimum {stake.min_stake})")
        return
    if not stake.registered:
        command = f"nectar operator register {fix}"
    elif stake.bonded < max(stake.min_stake, 1):
        missing = max(stake.min_stake, 1) - stake.bonded
        command = f"nectar operator stake {fix} --amount {missing / 10**18:g}"
    else:
        command = f"nectar operator register {fix}"  # re-points the registration at this peer id
    raise NotStaked(
        f"this node ({address}, peer {peer_id}) cannot earn through the ledger at {ledger_url}: {problem}. Run "
        f"`{command}` (same deployment file as the ledger), or pass --allow-unstaked to serve without pay"
    )


def check_audit_retention(ledger_url: str, retention_s: float) -> None:
    """Warns when this node drops audit records sooner than the ledger expects: audits of those steps would fail
    (a missing record is the node's failure, issue 21)."""
    from nectar.wire.ledger_api import LedgerClient

    try:
        with LedgerClient(ledger_url, timeout=5.0) as ledger:
            required = float(ledger.config().get("audit_retention_s") or 0)
    except Exception as e:  # an older or unreachable ledger: nothing to compare with
        logger.debug(f"Could not read the ledger's audit retention: {type(e).__name__}: {e}")
        return
    if retention_s < required:
        logger.warning(
            f"This node keeps audit records {retention_s:g}s but the ledger at {ledger_url} audits steps up to "
            f"{required:g}s after they are signed: audits it cannot answer count as failed. Start with "
            f"--audit-retention-s {required:g} (and enough --audit-disk-bytes for that long of traffic, or it refuses "
            "new sessions while full)"
        )


class Server:
    """Runs one node until ``stop()``; see ``NodeConfig`` for settings. ``start()`` returns once it serves.

    :param payments: where signed receipts and accepted vouchers go (the composition root wires it); default:
      ``LedgerPaymentPolicy`` when ``config.ledger_url`` is set, else ``NoPaymentPolicy``
    :param domain: the EIP-712 domain receipts and vouchers are signed under; default: the deployment file's
    """

    def __init__(self, config: NodeConfig, *, payments: PaymentPolicy | None = None, domain: dict | None = None):
        self.config = config
        if config.public_name and not public_name_valid(config.public_name):
            raise ValueError(
                f"--name must be at most {MAX_PUBLIC_NAME} printable characters (peers ignore the announcements of "
                f"any other name), got {config.public_name[:80]!r}"
            )
        model = with_revision(config.model, config.revision)
        self.model_path = resolve_model(model, token=config.hub_token)
        self.model_id = model_id_of(model)  # a Hub id: org/name@<commit>, so clients reach only these weights
        self.model_config = load_config(self.model_path)
        self.num_model_blocks = get_family(self.model_config).num_blocks(self.model_config)
        self.device = config.device or default_device()
        dtype_name = config.dtype or default_dtype(self.device)
        if dtype_name not in SUPPORTED_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype_name!r}")
        self.dtype_name, self.dtype = dtype_name, SUPPORTED_DTYPES[dtype_name]
        if config.quant not in QUANT_MODES:
            raise ValueError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {config.quant!r}")
        self.identity = claim_identity(config)
        self.key_dir, self.public_name = self.identity.path, config.public_name or self.identity.name
        if not config.key_dir and config.public_name in (DEFAULT_NAME, "", None):
            self.public_name = self.identity.name  # node, node-2, ...: tells the nodes of one machine apart
        try:
            self.p2p_key = load_or_create_p2p_identity(self.key_dir / "p2p.key")
            self.eth_key = load_or_create_eth_key(self.key_dir / "eth.json")
            # the keys this node signed receipts for, kept in its key folder (which it holds alone) across restarts,
            # for as long as the chain takes them as evidence, and an hour more (clock skew)
            self.signed_work = SignedWork(
                self.key_dir / "signed-work", window_s=max_evidence_age_from_deployment() + EVIDENCE_MARGIN_S
            )
            # each step's audit record, on disk in the key folder (unless kept in memory only): audits of steps served
            # before a restart are still answered (an unanswered audit is a failed spot check)
            on_disk = config.audit_disk_bytes > 0
            self.audit = AuditLog(
                max_bytes=config.audit_memory_bytes,
                retention_s=config.audit_retention_s,
                folder=(Path(config.audit_dir) if config.audit_dir else self.key_dir / "audit") if on_disk else None,
                max_disk_bytes=config.audit_disk_bytes,
            )
        except BaseException:
            self.identity.release()
            raise
        self.payments = payments
        self.domain = domain
        self.stop_event = threading.Event()
        self.loop = new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="nectar-p2p", daemon=True)
        self.dht: hivemind.DHT | None = None
        self.handler: NodeHandler | None = None
        self.announcer: Announcer | None = None
        self.direct: DirectServer | None = None
        self.signing: InlineSigning | SigningWorker | None = None
        self.direct_address = ""  # HOST:PORT once the direct lane listens
        self.relayed = False  # reachable only through relays (--reachability, or the check at start)
        self._serving = False  # the loop runs the node's handlers (it starts earlier: the reachability check)
        self._lanes: dict[int, tuple[float, dict]] = {}  # block -> (looked up at, {peer: info} announcing a lane)

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        trusted = TrustedClients.parse(config.trusted_clients, config.trusted_clients_file)  # bad addresses: fail now
        trace.start()
        if config.reachability not in ("auto", "direct", "relay"):
            raise ValueError(f"--reachability must be auto, direct or relay, got {config.reachability!r}")
        self.relayed = config.reachability == "relay"
        self._loop_thread.start()
        self.dht = self._create_dht(listen=not self.relayed)
        self.p2p = self._run(self.dht.replicate_p2p())
        self.addresses = [] if self.relayed else visible_addresses(self.dht)
        if config.reachability == "auto" and config.initial_peers:
            found = check_reachability(self.p2p, self.addresses, config.port, config.initial_peers)
            if self._run(found, timeout=120) is False:
                self._run(self.p2p.shutdown())  # a replica: closes this handle, then the DHT stops its daemon
                self.dht.shutdown()
                self.relayed = True
                self.dht = self._create_dht(listen=True)
                self.p2p = self._run(self.dht.replicate_p2p())
        if self.relayed:
            self.addresses = self._run(wait_for_relay(self.p2p), timeout=RELAY_WAIT + 30)
            if self.addresses:
                logger.info(f"Serving through relays at {', '.join(self.addresses)}")
            else:
                logger.warning(
                    f"No relay accepted this node within {RELAY_WAIT:g}s (libp2p looks for relays among the swarm's "
                    "peers that announce a public IP or DNS name): clients cannot reach it until one does. Check "
                    "--initial-peers, or serve directly (see docs/operators.md, behind NAT)"
                )
        domain = self.domain if self.domain is not None else domain_from_deployment()
        self.signer = ReceiptSigner(
            private_key=self.eth_key,
            model_id=config.sign_model_as or self.model_id,  # testing only: a liar's model id
            price_per_token=config.price_per_token,
            domain=domain,
            compute=ComputeSpec.of(self.dtype, self.device, self.config.quant),
        )
        if config.ledger_url and not config.allow_unstaked:
            check_stake(config.ledger_url, self.signer.address, str(self.dht.peer_id), self.key_dir)
        if config.ledger_url:
            check_audit_retention(config.ledger_url, config.audit_retention_s)
        backing = self._backing(self.signer.address)
        if backing is None and config.price_per_token > 0 and not trusted and config.free_credit_per_hour <= 0:
            raise ValueError(
                "a paid node (--price > 0) that checks no escrow (no --ledger-url, or --no-require-backing) would "
                "refuse every client: "
                "pass --ledger-url (credit against checked escrow), or --trusted-clients ADDRESS,... / "
                "--trusted-clients-file for a private swarm of clients you know (or --free-credit-per-hour)"
            )
        self.credit = CreditLedger(
            node_address=self.signer.address,
            credit_limit=config.credit_limit,
            domain=domain,
            backing=backing,
            free=FreeAllowance(config.free_credit_per_hour),
            trusted=trusted,
        )
        if config.receipt_signer not in ("process", "loop"):
            raise ValueError(f"receipt_signer must be 'process' or 'loop', got {config.receipt_signer!r}")
        if config.receipt_signer == "process":
            self.signing = SigningWorker(self.signer)
            self.signing.spawn()  # the child imports torch while the model loads
        else:
            self.signing = InlineSigning(self.signer)
        if self.payments is None:
            self.payments = self._payment_policy()
        start, end = self._choose_span()
        batch_wait = config.batch_wait if config.batch_wait is not None else default_batch_wait(self.device)
        self.compute = ComputeThread(num_threads=config.num_threads, gather_share=batch_wait)
        use_threads(config.num_threads)  # loading times the CPU's matmul libraries with the compute thread's count
        self._load(start, end)
        self._run(self._serve())
        self.announcer = Announcer(
            self.dht,
            self.model_id,
            self.num_model_blocks,
            self.server_info,
            period=config.announce_period,
            eth_key=self.signer.private_key,
        )
        self.announcer.start()
        self._rebalancer = threading.Thread(target=self._rebalance_loop, name="nectar-rebalance", daemon=True)
        self._rebalancer.start()
        logger.info(
            f"Serving {self.model_id} blocks {self.backend.start}:{self.backend.end} as {self.dht.peer_id}, "
            f"receipts signed by {self.signer.address}"
        )

    def _run(self, coro, timeout: float = 60):
        """Runs ``coro`` on the node's event loop (where its P2P handle lives) and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def _create_dht(self, *, listen: bool) -> hivemind.DHT:
        config = self.config
        return create_dht(
            host=config.host,
            port=config.port,
            initial_peers=config.initial_peers,
            identity_path=self.key_dir / "p2p.key",
            private_key=self.p2p_key,
            announce_host=config.announce_host,
            relayed=self.relayed,
            listen=listen,
        )

    def _backing(self, address: str) -> BackingCache | None:
        """With a ledger, vouchers count as paid only as far as the chain backs them (issue 20); without one only
        trusted clients' vouchers count (``--trusted-clients``)."""
        if not self.config.ledger_url or not self.config.require_backing:
            return None
        from nectar.wire.ledger_api import LedgerClient  # only nodes that report to a ledger load httpx

        ledger = LedgerClient(self.config.ledger_url, timeout=2.0)
        return BackingCache(lambda client: ledger.backing(client, address).backed)

    def _payment_policy(self) -> PaymentPolicy:
        if not self.config.ledger_url:
            return NoPaymentPolicy()
        from nectar.wire.ledger_api import LedgerPaymentPolicy  # only nodes that report to a ledger load httpx

        return LedgerPaymentPolicy(self.config.ledger_url)

    async def _serve(self) -> None:
        self._serving = True
        if isinstance(self.signing, SigningWorker):
            await self.signing.connect()
        await self.handler.add_handlers(self.p2p)
        self.reachability = ReachabilityService(self.p2p)  # dials others back for their own checks
        await self.reachability.add_handler()
        if self.config.direct_port is not None and self.relayed:
            logger.info("No direct lane: nobody can dial a relayed node (clients use P2P through the relay)")
        elif self.config.direct_port is not None:
            self.direct = DirectServer(
                self.handler.handlers(),
                local_id=self.p2p.peer_id,
                max_frame_bytes=self.handler.max_frame_bytes,
                max_connections_per_address=self.config.direct_connections_per_address,
            )
            port = await self.direct.start(self.config.host, self.config.direct_port)
            self.direct_address = f"{self._direct_host()}:{port}"
            logger.info(f"Direct TCP lane on {self.direct_address}")

    def _direct_host(self) -> str:
        """The address clients should dial for the direct lane: the announced one, else the bound one, else the
        first IPv4 address the P2P daemon reports."""
        if self.config.announce_host:
            return self.config.announce_host
        if self.config.host not in ("0.0.0.0", "::", ""):
            return self.config.host
        for address in self.addresses:
            parts = address.split("/")
            if len(parts) > 2 and parts[1] == "ip4":
                return parts[2]
        return "127.0.0.1"

    def _load(self, start: int, end: int) -> None:
        backend = SpanBackend(
            self.model_path,
            start,
            end,
            dtype=self.dtype,
            device=self.device,
            adapters=self.config.adapters,
            base_names={self.model_id, self.model_path.name, str(self.config.model)},
            quantization=self.config.quant,
            page_size=self.config.kv_page_size
            if self.config.kv_page_size is not None
            else default_kv_page_size(str(self.device)),
            cache_bytes=self.config.cache_memory_bytes,
        )
        if self.config.throughput is not None:
            inference_rps = forward_rps = float(self.config.throughput)
        else:
            inference_rps, forward_rps = backend.measure()
        hidden_bytes = backend.hidden_size * 4  # activations travel as float32
        self.network_rps = self.config.bandwidth_mbps * 1e6 / 8 / hidden_bytes
        self.inference_rps, self.forward_rps = inference_rps, forward_rps
        per_block = inference_rps * (end - start) if self.config.throughput is None else inference_rps
        self.throughput = min(per_block, self.network_rps)
        memory = MemoryCache(
            self.config.cache_memory_bytes,
            backend.cache_bytes_per_token(start, end, 1),
            client_share=self.config.client_cache_share,
            client_sessions=self.config.client_max_sessions,
            unbacked_share=self.config.unbacked_cache_share,
        )
        if self.handler is None:
            steps = NodeSteps(
                backend,
                config=self.config,
                model_id=self.model_id,
                compute=self.compute,
                memory=memory,
                signer=self.signer,
                credit=self.credit,
                audit=self.audit,
                payments=self.payments,
                signing=self.signing,
                signed_work=self.signed_work,
            )
            self.handler = NodeHandler(
                steps, info_provider=self.rpc_info, push_allowed=self.announces_lane, audit_gate=self._audit_gate()
            )
        else:
            self.handler.backend, self.handler.memory = backend, memory
        self.backend = backend

    def _audit_gate(self) -> AuditGate:
        """Audits are answered to the ledger's verifiers (and any the operator names) only."""
        fetch = None
        if self.config.ledger_url:
            from nectar.wire.ledger_api import LedgerClient  # only nodes that report to a ledger load httpx

            ledger_url = self.config.ledger_url

            def fetch() -> list[str]:
                with LedgerClient(ledger_url, timeout=5.0) as ledger:
                    return ledger.verifiers()

        fixed = [a.strip() for a in self.config.audit_verifiers.split(",") if a.strip()]
        return AuditGate(node_address=self.signer.address, fixed=fixed, fetch=fetch)

    def server_info(self, state: ServerState = ServerState.ONLINE) -> ServerInfo:
        return ServerInfo(
            state=int(state),
            start=self.backend.start,
            end=self.backend.end,
            throughput=self.throughput,
            inference_rps=self.inference_rps,
            forward_rps=self.forward_rps,
            network_rps=self.network_rps,
            dtype=self.dtype_name,
            quant=self.config.quant,
            cache_tokens_left=self.handler.memory.tokens_left,
            price_per_token=self.config.price_per_token,
            credit_limit=min(self.config.credit_limit, MAX_ANNOUNCED_CREDIT),
            eth_address=self.signer.address,
            public_name=self.public_name,
            direct_address=self.direct_address,
            relayed=self.relayed,
            adapters=self.backend.adapters.names,
        )

    def rpc_info(self) -> dict:
        info = self.server_info().to_dict()
        stats = self.compute.stats
        info.update(
            model=self.model_id,
            num_model_blocks=self.num_model_blocks,
            version=PROTOCOL_VERSION,
            active_sessions=self.handler.active_sessions,
            compute={
                "inference_rounds": stats.batches,
                "inference_steps": stats.steps,
                "max_batch": stats.max_batch,
                "max_runner_batch": self.backend.max_runner_batch,  # 0: the generic path, one step at a time
                "training_requests": stats.training,
                "inference_seconds": stats.inference_seconds,
                "gather_seconds": stats.gather_seconds,
                "step_handling_seconds": self.handler.step_seconds,
                "receipts_riding": self.handler.receipts_riding,
                "vouchers_checked": self.handler.steps.credit.vouchers_checked,
                "loop_cpu_seconds": self._loop_cpu_seconds(),
                **self._graph_counters(),
            },
            push={"sent": self.handler.pushes_sent, "received": self.handler.inbox.received},
        )
        return info

    def _loop_cpu_seconds(self) -> float:
        """CPU time of the event-loop thread so far: all its network, handler and signing work."""
        return time.clock_gettime(time.pthread_getcpuclockid(self._loop_thread.ident))

    def _graph_counters(self) -> dict:
        graphs = self.backend.decode_graphs
        counters = {"graph_rounds": graphs.replays, "graphs_recorded": graphs.recorded} if graphs is not None else {}
        paged = self.backend.paged
        if paged is not None:  # paged rounds count with the others (graphs_recorded: both kinds' recordings)
            counters["graph_rounds"] = counters.get("graph_rounds", 0) + paged.replays
            counters["graphs_recorded"] = counters.get("graphs_recorded", 0) + paged.recorded
            counters["kv_pages_reserved"] = self.backend.pages.reserved_pages
        return counters

    def stop(self) -> None:
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        if self.announcer is not None:
            self.announcer.stop(self.server_info(ServerState.OFFLINE))
        if self.payments is not None:
            self.payments.shutdown()
        if self.direct is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.direct.close(), self.loop).result(timeout=10)
            except Exception:
                logger.debug("The direct lane did not close cleanly", exc_info=True)
        if self.signing is not None and self._serving:
            try:
                asyncio.run_coroutine_threadsafe(self.signing.close(), self.loop).result(timeout=10)
            except Exception:
                logger.debug("The signing process did not stop cleanly", exc_info=True)
        elif isinstance(self.signing, SigningWorker):  # the node failed before its loop ran
            self.signing.kill()
        if getattr(self, "p2p", None) is not None and self._loop_thread.is_alive():
            try:  # its reader tasks end now, not as "destroyed but pending" errors once the loop is gone
                asyncio.run_coroutine_threadsafe(self.p2p.shutdown(), self.loop).result(timeout=10)
            except Exception:
                logger.debug("The P2P handle did not close cleanly", exc_info=True)
        if self.dht is not None:
            self.dht.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.signed_work.close()
        self.audit.close()
        self.identity.release()
        trace.dump()

    def wait(self) -> None:
        while not self.stop_event.wait(1.0):
            pass

    async def announces_lane(self, address: str, block: int) -> bool:
        """Whether ``address`` is the direct lane of an announced node serving ``block`` (``push.lane_owner``: push
        targets only). Records are looked up in the DHT at most once per 10 s per block, or again after 1 s when the
        address is not found."""
        looked_up, announced = self._lanes.get(block, (0.0, {}))
        age = time.monotonic() - looked_up
        lanes = {info.direct_address for info in announced.values()}
        if age > 10.0 or (address not in lanes and age > 1.0):
            swarm = await asyncio.get_running_loop().run_in_executor(
                None, partial(read_swarm, self.dht, self.model_id, self.num_model_blocks, blocks=[block])
            )
            announced = {peer: info for peer, info in swarm.blocks[block].items() if info.direct_address}
            self._lanes[block] = (time.monotonic(), announced)
        return await lane_owner(self.p2p, announced, address) is not None

    # ---- span choice ------------------------------------------------------------------------------------------

    def _swarm_spans(self) -> list[tuple[int, int, float]]:
        """(start, end, throughput) of every other online node."""
        swarm = read_swarm(
            self.dht, self.model_id, self.num_model_blocks, states=(ServerState.JOINING, ServerState.ONLINE)
        )
        return [
            (info.start, info.end, info.throughput)
            for peer_id, info in swarm.servers().items()
            if peer_id != self.dht.peer_id
        ]

    def _span_length(self) -> int:
        return min(self.config.num_blocks or self.num_model_blocks, self.num_model_blocks)

    def _choose_span(self) -> tuple[int, int]:
        if self.config.blocks is not None:
            start, end = self.config.blocks
            if not (0 <= start < end <= self.num_model_blocks):
                raise ValueError(f"--blocks {start}:{end} is outside the model's {self.num_model_blocks} blocks")
            return start, end
        length = self._span_length()
        start = choose_best_start(block_throughputs(self.num_model_blocks, self._swarm_spans()), length)
        logger.info(f"Chose blocks {start}:{start + length} (the least-served part of the swarm)")
        return start, start + length

    def _rebalance_loop(self) -> None:
        if self.config.blocks is not None:
            return  # the operator chose the span
        while not self.stop_event.wait(self.config.rebalance_period * random.uniform(0.8, 1.2)):
            try:
                others = block_throughputs(self.num_model_blocks, self._swarm_spans())
                better = should_move(
                    others,
                    current_start=self.backend.start,
                    length=self._span_length(),
                    own_throughput=self.throughput,
                    balance_quality=self.config.balance_quality,
                )
                if better is None or self.handler.active_sessions > 0:
                    continue
                logger.info(
                    f"Re-balancing: moving from blocks {self.backend.start}:{self.backend.end} "
                    f"to {better}:{better + self._span_length()}"
                )
                self.announcer.withdraw(self.server_info(ServerState.OFFLINE))
                self._load(better, better + self._span_length())
                self.announcer.announce_now()
            except Exception:
                logger.warning("Re-balancing check failed (will retry)", exc_info=True)
