"""All of a node's settings in one dataclass (the CLI fills it; tests build it directly)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class NodeConfig:
    model: str = "smollm2-135m"  # built-in model name or a local Hugging Face checkpoint directory
    blocks: Optional[tuple[int, int]] = None  # [start, end) to host; None = choose the least-served span
    num_blocks: Optional[int] = None  # span length when choosing automatically; None = all blocks
    host: str = "0.0.0.0"  # address to listen on (127.0.0.1 for a local swarm)
    port: int = 0  # TCP port; 0 = any free port
    announce_host: Optional[str] = None  # address to announce if different from host
    direct_port: Optional[int] = None  # also serve RPCs on this plain TCP port (0 = any; loopback/LAN); None = off
    initial_peers: Sequence[str] = ()  # multiaddrs of swarm peers; empty = start a new swarm
    dtype: Optional[str] = None  # float32 | float16 | bfloat16; None = float32 on CPU, float16 on CUDA
    device: Optional[str] = None  # cpu | cuda | cuda:N; None = cuda if available
    num_threads: Optional[int] = None  # torch intra-op threads for compute; None = torch default
    cache_memory_bytes: int = 512 * 1024**2  # KV-cache budget across all sessions
    session_timeout: float = 120.0  # seconds an inference session may stay idle before its cache is freed
    batch_wait: float = 0.0  # share of the last round's compute time a decode round waits for its sessions' next steps
    receipt_delay: float = 0.01  # quiet seconds after which a separate receipt is signed without a next step
    receipt_signer: str = "process"  # process: a child process signs receipts; loop: the event loop signs them
    step_timeout: float = 300.0  # seconds a forward/backward request may wait in the queue
    announce_period: float = 10.0  # seconds between DHT announcements
    rebalance_period: float = 60.0  # seconds between checks whether another span would serve the swarm better
    balance_quality: float = 0.75  # move only if the swarm's weakest block would improve by more than 1/quality
    throughput: Optional[float] = None  # tokens/s per block to announce; None = measure at start
    bandwidth_mbps: float = 100.0  # link speed assumed for the network part of throughput
    price_per_token: int = 0  # credit wei per token per block
    credit_limit: int = 10**18  # unpaid credit wei per client before the node asks for a voucher
    key_dir: Optional[Path] = None  # where the P2P and Ethereum keys live; None = ~/.nectar/nodes/<public_name>
    public_name: str = "node"
    ledger_url: Optional[str] = None  # submit receipts and vouchers to this ledger service
    audit_retention_s: float = 900.0  # how long a session's inputs are kept for spot checks
    audit_memory_bytes: int = 256 * 1024**2
    corrupt_rate: float = 0.0  # testing only: share of outputs this node corrupts (a cheating node for spot checks)
    extra: dict = field(default_factory=dict)
