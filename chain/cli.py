"""`nectar devnet`: Anvil on 127.0.0.1 with Nectar deployed, in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from nectar.cli_kit import add_logging_options, setup_logging

from .devnet import start_devnet

logger = logging.getLogger(__name__)


def devnet_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar devnet", description=__doc__)
    parser.add_argument("--port", type=int, default=8545, help="RPC port on 127.0.0.1 (default 8545)")
    parser.add_argument(
        "--state-dir", default=None, help="folder for anvil.log (and deployment.json if no --deployment)"
    )
    parser.add_argument(
        "--deployment",
        default=None,
        help="where to write the deployment file (default: $NECTAR_DEPLOYMENT or ~/.nectar/deployment.json)",
    )
    parser.add_argument("--block-time", type=float, default=None, help="seconds per block (default: instant mining)")
    add_logging_options(parser, default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        handle = start_devnet(
            port=args.port, state_dir=args.state_dir, deployment_path=args.deployment, block_time=args.block_time
        )
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"nectar devnet: {exc}")
        return 1
    try:
        print(f"rpc url:     {handle.rpc_url}", flush=True)
        print(f"deployment:  {handle.deployment_path}", flush=True)
        for name, info in handle.deployment.contracts.items():
            print(f"  {name:<13} {info['address']}")
        print("demo accounts (Anvil dev keys, devnet only):")
        for account in handle.deployment.accounts:
            print(f"  {account['role']:<9} {account['address']}  {account['privateKey']}")
        print("Ctrl-C to stop.", flush=True)
        while not stop.is_set():
            if not handle.is_running():
                print(f"anvil exited unexpectedly; see {handle.log_path}")
                return 1
            stop.wait(0.5)
    finally:
        handle.stop()
    print("devnet stopped.")
    return 0
