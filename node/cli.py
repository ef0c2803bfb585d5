"""``nectar dht`` and ``nectar node``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from nectar.cli_kit import (
    add_logging_options,
    add_options,
    add_swarm_option,
    config_values,
    options_of,
    setup_logging,
    swarm_file,
)
from nectar.node.config import NodeConfig
from nectar.wire.peers import SwarmFileError, initial_peers

logger = logging.getLogger(__name__)


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END (e.g. 8:16), got {text!r}")
    return start, end


NETWORK = ("host", "port", "announce_host", "initial_peers")  # NodeConfig fields a bootstrap peer shares too
NOT_OPTIONS = ("cache_memory_bytes", "extra")  # --cache-mb (MiB) stands for the first; extra is for code only
OPTIONS = {  # NodeConfig fields whose flag, type or help differ from what the field itself gives
    "initial_peers": dict(nargs="*", default=None, metavar="MULTIADDR"),  # None: NECTAR_INITIAL_PEERS, then none
    "blocks": dict(type=parse_blocks, nargs=None, metavar="START:END"),
    "dtype": dict(choices=["float32", "float16", "bfloat16"]),
    "receipt_signer": dict(choices=["process", "loop"]),
    "reachability": dict(choices=["auto", "direct", "relay"]),
    "price_per_token": dict(flags=["--price"]),
    "public_name": dict(flags=["--name"]),
    "hub_token": dict(flags=["--token"]),
    "corrupt_rate": dict(help=argparse.SUPPRESS),  # tests: a cheating node
    "corrupt_scale": dict(help=argparse.SUPPRESS),  # tests: the cheat's noise (times the mean magnitude)
    "sign_model_as": dict(help=argparse.SUPPRESS),  # tests: a node signing receipts for another model
    "evade_audits": dict(help=argparse.SUPPRESS),  # tests: a cheating node that refuses audits of its cheats
}


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, NodeConfig, NETWORK, overrides=OPTIONS)
    add_swarm_option(parser)
    add_logging_options(parser, default="INFO", verbose="DEBUG")


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


def dht_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nectar dht", description="Start a bootstrap DHT peer for a swarm.")
    _add_network_args(parser)
    parser.add_argument("--identity", default=None, help="libp2p key file, for a stable peer id across restarts")
    return parser


def dht_main(argv: list[str]) -> int:
    args = dht_parser().parse_args(argv)
    setup_logging(args)
    from pathlib import Path

    from nectar.node.identity import load_or_create_p2p_identity
    from nectar.node.server import create_dht, visible_addresses

    private_key = load_or_create_p2p_identity(Path(args.identity)) if args.identity else None
    try:
        peers = initial_peers(args.initial_peers, env=os.environ, swarm=swarm_file(args.swarm, env=os.environ))
    except SwarmFileError as e:
        print(f"nectar dht: {e}", file=sys.stderr)
        return 2
    dht = create_dht(
        host=args.host,
        port=args.port,
        initial_peers=peers,
        identity_path=Path(args.identity) if args.identity else None,
        private_key=private_key,
        announce_host=args.announce_host,
    )
    reachability = serve_reachability(dht)  # noqa: F841 (kept alive while the peer runs)
    print_join_address(visible_addresses(dht), what="Bootstrap peer")
    _wait_for_signal(dht.shutdown)
    return 0


def serve_reachability(dht):
    """Answers nodes' ``nectar.reachability`` checks (a bootstrap peer is the first one a new node asks)."""
    import asyncio

    from nectar.wire.event_loop import new_event_loop
    from nectar.wire.reachability import ReachabilityService

    loop = new_event_loop()
    threading.Thread(target=loop.run_forever, name="nectar-reachability", daemon=True).start()

    async def serve() -> ReachabilityService:
        service = ReachabilityService(await dht.replicate_p2p())
        await service.add_handler()
        return service

    return asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=30)


def node_fields() -> list[str]:
    """The NodeConfig fields `nectar node` has an option for (under the field's name, or OPTIONS' flag)."""
    return [name for name in options_of(NodeConfig) if name not in NOT_OPTIONS]


def node_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nectar node", description="Host a span of transformer blocks.")
    _add_network_args(parser)
    add_options(parser, NodeConfig, [name for name in node_fields() if name not in NETWORK], overrides=OPTIONS)
    parser.set_defaults(model=None, ledger_url=None)  # not given: the swarm file's, else NodeConfig's (node_config)
    parser.add_argument(
        "--cache-mb",
        type=float,
        default=NodeConfig.cache_memory_bytes / 2**20,
        help="KV-cache budget in MiB across all sessions (default: %(default)g)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.5,
        help="ms a busy thread may hold the GIL while another waits (Python's default is 5): the "
        "compute thread takes it back between torch ops while the event loop signs receipts",
    )
    return parser


def node_config(args: argparse.Namespace) -> NodeConfig:
    values = config_values(args, node_fields())
    swarm = swarm_file(args.swarm, env=os.environ)
    values["initial_peers"] = initial_peers(args.initial_peers, env=os.environ, swarm=swarm)
    values["model"] = values["model"] or (swarm and swarm.model) or NodeConfig.model
    values["ledger_url"] = values["ledger_url"] or (swarm and swarm.ledger_url) or None
    return NodeConfig(**values, cache_memory_bytes=int(args.cache_mb * 2**20))


def node_main(argv: list[str]) -> int:
    args = node_parser().parse_args(argv)
    setup_logging(args)
    sys.setswitchinterval(args.switch_interval / 1000)
    from nectar.models import ModelError
    from nectar.node.server import NotStaked, Server

    try:
        config = node_config(args)
    except SwarmFileError as e:
        print(f"nectar node: {e}", file=sys.stderr)
        return 2
    server = None
    try:
        server = Server(config)
        server.start()
    except (ValueError, FileNotFoundError, ModelError) as e:  # ModelError: no such model, or its download failed
        print(f"nectar node: {e}", file=sys.stderr)
        return 2
    except NotStaked as e:
        server.stop()
        print(f"nectar node: {e}", file=sys.stderr)
        return 1
    print(
        f"Hosting {server.model_id} blocks {server.backend.start}:{server.backend.end} "
        f"(receipts signed by {server.signer.address})",
        flush=True,
    )
    print_join_address(server.addresses, what="Node")
    _wait_for_signal(server.stop)
    return 0
