"""``nectar dht`` and ``nectar node``."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "asyncio", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def initial_peers_from(args_peers: list[str] | None) -> list[str]:
    if args_peers:
        return list(args_peers)
    env = os.environ.get("NECTAR_INITIAL_PEERS", "")
    return [p for p in env.replace(",", " ").split() if p]


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1 for a local swarm)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    parser.add_argument("--announce-host", default=None, help="public address to announce, if not --host")
    parser.add_argument("--initial-peers", nargs="*", default=None, metavar="MULTIADDR",
                        help="multiaddrs of swarm peers (or set NECTAR_INITIAL_PEERS); none = start a new swarm")
    parser.add_argument("-v", "--verbose", action="store_true")


def print_join_address(addresses: list[str], *, what: str) -> None:
    print(f"{what} is up. Others join with --initial-peers and this address:", flush=True)
    for address in addresses:
        print(address, flush=True)


def _wait_for_signal(stop) -> None:
    done = threading.Event()

    def handle(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
    stop()


def dht_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar dht", description="Start a bootstrap DHT peer for a swarm.")
    _add_network_args(parser)
    parser.add_argument("--identity", default=None, help="libp2p key file, for a stable peer id across restarts")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from pathlib import Path

    from nectar.node.server import create_dht, visible_addresses
    from nectar.node.identity import load_or_create_p2p_identity

    private_key = load_or_create_p2p_identity(Path(args.identity)) if args.identity else None
    dht = create_dht(host=args.host, port=args.port, initial_peers=initial_peers_from(args.initial_peers),
                     identity_path=Path(args.identity) if args.identity else None, private_key=private_key,
                     announce_host=args.announce_host)
    print_join_address(visible_addresses(dht), what="Bootstrap peer")
    _wait_for_signal(dht.shutdown)
    return 0


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END (e.g. 8:16), got {text!r}")
    return start, end


def node_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar node", description="Host a span of transformer blocks.")
    parser.add_argument("--model", default="smollm2-135m", help="built-in model name or local checkpoint directory")
    parser.add_argument("--blocks", type=parse_blocks, default=None, help="blocks to host, START:END (half-open)")
    parser.add_argument("--num-blocks", type=int, default=None, help="span length when choosing automatically")
    _add_network_args(parser)
    parser.add_argument("--direct-port", type=int, default=None,
                        help="also serve on this plain TCP port (0 = any free port) for clients that can reach it: "
                             "skips the P2P daemons (faster), unencrypted, so for loopback or a trusted LAN")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads for compute")
    parser.add_argument("--cache-mb", type=float, default=512, help="KV-cache budget in MiB across all sessions")
    parser.add_argument("--batch-wait", type=float, default=0.0,
                        help="let a decode round wait for the last rounds' sessions: up to this share of the last "
                             "round's compute time, or 1.25x the last wait (at most 50 ms); 0 = start at once. Try 0.5 "
                             "on a node that serves many sessions alone, above all on a GPU")
    parser.add_argument("--session-timeout", type=float, default=120, help="idle seconds before a session expires")
    parser.add_argument("--switch-interval", type=float, default=0.5,
                        help="ms a busy thread may hold the GIL while another waits (Python's default is 5): the "
                             "compute thread takes it back between torch ops while the event loop signs receipts")
    parser.add_argument("--receipt-signer", choices=["process", "loop"], default="process",
                        help="where receipts are signed: a child process (default; keeps the event loop free for "
                             "other sessions' steps) or the event loop itself (one process less)")
    parser.add_argument("--announce-period", type=float, default=10)
    parser.add_argument("--rebalance-period", type=float, default=60)
    parser.add_argument("--throughput", type=float, default=None, help="announce this tokens/s instead of measuring")
    parser.add_argument("--price", type=int, default=0, help="credit wei per token per block")
    parser.add_argument("--credit-limit", type=int, default=10**18, help="unpaid credit wei allowed per client")
    parser.add_argument("--key-dir", default=None, help="where this node's keys live (default ~/.nectar/nodes/NAME)")
    parser.add_argument("--name", default="node", help="public name, also names the default key directory")
    parser.add_argument("--ledger-url", default=None, help="submit receipts and vouchers to this ledger")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a cheating node
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    sys.setswitchinterval(args.switch_interval / 1000)
    from nectar.node.config import NodeConfig
    from nectar.node.server import Server

    config = NodeConfig(
        model=args.model, blocks=args.blocks, num_blocks=args.num_blocks, host=args.host, port=args.port,
        announce_host=args.announce_host, direct_port=args.direct_port, initial_peers=initial_peers_from(args.initial_peers), dtype=args.dtype,
        device=args.device, num_threads=args.num_threads, cache_memory_bytes=int(args.cache_mb * 2**20),
        session_timeout=args.session_timeout, batch_wait=args.batch_wait, announce_period=args.announce_period,
        rebalance_period=args.rebalance_period, throughput=args.throughput, price_per_token=args.price,
        credit_limit=args.credit_limit, key_dir=args.key_dir, public_name=args.name, ledger_url=args.ledger_url,
        corrupt_rate=args.corrupt_rate, receipt_signer=args.receipt_signer,
    )
    try:
        server = Server(config)
        server.start()
    except (ValueError, FileNotFoundError) as e:
        print(f"nectar node: {e}", file=sys.stderr)
        return 2
    print(f"Hosting {server.model_id} blocks {server.backend.start}:{server.backend.end} "
          f"(receipts signed by {server.signer.address})", flush=True)
    print_join_address(server.addresses, what="Node")
    _wait_for_signal(server.stop)
    return 0
