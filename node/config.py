"""All of a node's settings in one dataclass (``nectar node`` builds its options from it; tests build it directly).

Each field's trailing comment is its help text and its line in docs/configuration.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class NodeConfig:
    model: str = "smollm2-135m"  # built-in model name, local Hugging Face checkpoint directory, or Hub id (org/name;
    # fetches config, tokenizer and only the hosted blocks' shards into the Hugging Face cache; HF_HUB_OFFLINE=1: cache
    # only)
    revision: str | None = None  # Hub branch, tag or commit of a Hub id --model; None = main. Announced as its commit
    hub_token: str | None = field(default=None, repr=False)  # Hugging Face token for gated or private Hub models;
    # None = HF_TOKEN or `hf auth login`'s (prefer those: a flag shows in the process list)
    blocks: tuple[int, int] | None = None  # blocks to host, [start, end) (START:END on the command line); None =
    # choose the least-served span
    num_blocks: int | None = None  # span length when choosing automatically; None = all blocks
    host: str = "0.0.0.0"  # address to listen on (127.0.0.1 for a local swarm)
    port: int = 0  # TCP port; 0 = any free port
    announce_host: str | None = None  # IP address or DNS name to announce if different from host (with a fixed
    # --port): a port-forwarded public address, or a DNS name (peers use such addresses as relays)
    reachability: str = "auto"  # auto: at start, ask peers to dial this node back and serve through relays if none
    # can (behind NAT); direct: skip the check; relay: serve only through relays, listening on no port
    direct_port: int | None = None  # also serve on this plain TCP port (0 = any free port) for clients that can
    # reach it: skips the P2P daemons (faster), unencrypted, so for loopback or a trusted LAN; None = off
    direct_connections_per_address: int = 256  # open direct-lane connections one remote host may hold; more are
    # refused with an error (each connection carries one stream: raise it for an API server with many sessions)
    max_frame_bytes: int | None = None  # largest message a caller may send (both lanes); a larger frame is refused
    # from its header, before its body is read. None = what the model needs: 3 x 8192 tokens of float32 activations
    initial_peers: Sequence[str] = ()  # multiaddrs of swarm peers (or NECTAR_INITIAL_PEERS); empty = start a new swarm
    adapters: Sequence[str] = ()  # local PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors)
    # to serve on this node's blocks; a request names one by its folder name (at most 16)
    dtype: str | None = None  # float32 | float16 | bfloat16; None = float32 on CPU, float16 on CUDA
    device: str | None = None  # cpu | cuda | cuda:N; None = cuda if available
    quant: str = "none"  # weight quantization of the blocks' linear layers (bitsandbytes): none | int8 (weight-only,
    # per-row absmax) | nf4 (4-bit NormalFloat); announced, and committed to in every receipt (audits recompute in it);
    # a pre-quantized checkpoint (config.json's quantization_config) is served only with its own mode
    num_threads: int | None = None  # torch intra-op threads for compute; None = torch default
    cache_memory_bytes: int = 512 * 1024**2  # KV-cache budget in bytes across all sessions (--cache-mb: in MiB)
    kv_page_size: int | None = None  # > 0: one-sequence sessions keep their keys/values in a pool of pages of this
    # many tokens, allocated at load to the whole KV-cache budget, and their decode rounds replay one CUDA graph per
    # round size for any sessions (Llama-shaped blocks; others keep their own caches); 0 = each session its own
    # cache, rounds recorded per set of sessions; None = 16 on a GPU, 0 on a CPU
    session_timeout: float = 120.0  # seconds an inference session may stay idle before its cache is freed
    batch_wait: float | None = None  # let a decode round wait for the last rounds' sessions: up to this share of the
    # last round's compute time, or 1.25x the last wait (at most two rounds; after a wait that timed out, up to twice
    # that by chance within the cap, so two nodes sharing a GPU do not time out together), and only for sessions
    # expected back within the cap (from how long each was away lately); 0 = start at once;
    # None = 0.5 on a GPU (a round there costs about one read of the weights however many sessions it holds), 0 on a CPU
    receipt_delay: float = 0.01  # quiet seconds after which a separate receipt is signed without a next step
    voucher_check_interval: float = 0.5  # a client's newest vouchers have their signatures checked at most this many
    # seconds after the last check (sooner where credit needs it, and as its sessions end); until then they count for
    # nothing. 0 = every voucher as it comes
    receipt_signer: str = "process"  # where receipts are signed: process (a child process; keeps the event loop free
    # for other sessions' steps) or loop (the event loop itself; one process less)
    step_timeout: float = 300.0  # seconds a forward/backward request may wait in the queue
    announce_period: float = 10.0  # seconds between DHT announcements
    rebalance_period: float = 60.0  # seconds between checks whether another span would serve the swarm better
    balance_quality: float = 0.75  # move only if the swarm's weakest block would improve by more than 1/quality
    throughput: float | None = None  # tokens/s per block to announce; None = measure at start
    bandwidth_mbps: float = 100.0  # link speed assumed for the network part of throughput
    price_per_token: int = 0  # credit wei per token per block
    credit_limit: int = 10**18  # credit wei a client may owe this node beyond what backs it: with a ledger, its
    # vouchers count as paid only as far as settled payments plus its reserve for this node cover them (issue 20);
    # without, as far as they go. The node's own risk: what a client that never pays can take from it
    require_backing: bool = True  # with a ledger, check vouchers against the chain (through the ledger) before
    # extending credit; off = no escrow check: only --trusted-clients get credit (and everyone the free allowance)
    trusted_clients: str = ""  # client addresses (comma separated) whose vouchers this node trusts without checking
    # escrow, each up to --credit-limit: a private swarm's own clients. Every other address gets only the free
    # allowance (--free-credit-per-hour), with or without a ledger
    trusted_clients_file: Path | None = None  # a file of more such addresses (one a line, # comments), reread when
    # it changes: add or remove a client without restarting the node
    free_credit_per_hour: int = 0  # credit wei an hour this node serves to clients nothing backs, all of them
    # together (so rotating addresses gets no more); 0 = none: unbacked clients are refused until they reserve escrow
    client_cache_share: float = 0.5  # the most of the KV-cache budget one client (signing address) may hold at once
    client_max_sessions: int = 8  # the most inference sessions one client may hold open here at once
    unbacked_cache_share: float = 0.1  # the most of the KV-cache budget clients on the free allowance (no escrow,
    # not trusted) may hold, all of them together and at most --client-max-sessions sessions; their oldest session is
    # ended when a backed or trusted client needs the room
    key_dir: Path | None = None  # where the P2P and Ethereum keys live; None = ~/.nectar/nodes/<public_name>
    public_name: str = "node"  # public name, also names the default key directory
    ledger_url: str | None = None  # submit receipts and vouchers to this ledger service
    allow_unstaked: bool = False  # with --ledger-url: start even if this node is not registered with the minimum
    # stake (it serves unpaid: gated clients do not route to it and the ledger refuses its vouchers)
    audit_retention_s: float = 900.0  # how long a session's inputs and outputs are kept for spot checks
    audit_memory_bytes: int = 512 * 1024**2  # memory budget for those: their index, or with --audit-disk-bytes 0 the
    # records themselves. Records are never dropped before their retention: when full, the node refuses new sessions
    audit_dir: Path | None = None  # where those are written, so a restarted node still answers audits of steps it
    # served before; None = <key folder>/audit
    audit_disk_bytes: int = 16 * 1024**3  # disk budget for those (when full, new sessions are refused: try another
    # node); 0 = keep them in memory only (lost on restart, and audits of earlier steps then fail)
    audit_verifiers: str = ""  # addresses (comma separated) allowed to audit this node besides the ledger's verifiers
    # (GET /v1/verifiers); audits carry users' inputs, so nobody else gets an answer
    corrupt_rate: float = 0.0  # testing only: share of outputs this node corrupts (a cheating node for spot checks)
    corrupt_scale: float = 1.0  # testing only: the corruption's noise, times the output's mean magnitude
    sign_model_as: str = ""  # testing only: sign receipts for this model instead (a node lying about its model)
    evade_audits: bool = False  # testing only: refuse the audits of the steps it corrupted (says it has no record)
    extra: dict = field(default_factory=dict)  # free-form values for experiments (no flag); nectar itself reads none
