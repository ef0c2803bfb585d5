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


ESCROW_DOC = """`nectar escrow`: a paying client's escrow: deposit, reserve for a node, release, status.

A node extends credit only against what backs a client's vouchers to it on chain: what settled, plus the client's
reserve for that node (`reserve`), which only that node's vouchers can draw on and which leaves only through
`release-request` + the unlock delay (`release` afterwards). Amounts are in credits (decimals allowed)."""


def _wei(text: str) -> int:
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text) * 10**18
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of credits (e.g. 10 or 0.5)") from None
    if value <= 0 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive amount with at most 18 decimals")
    return int(value)


def escrow_main(argv: list[str]) -> int:
    from pathlib import Path

    from eth_account import Account

    from .client import Chain
    from .deployment import DeploymentNotFound
    from .errors import ChainError

    parser = argparse.ArgumentParser(prog="nectar escrow", description=ESCROW_DOC)
    parser.add_argument("action", choices=("status", "deposit", "reserve", "release-request", "release"))
    parser.add_argument("--key", help="the client's private key (hex); or --key-file")
    parser.add_argument("--key-file", type=Path, help="file holding the client's private key (hex)")
    parser.add_argument("--node", help="node address (reserve, release-request, release, status)")
    parser.add_argument("--amount", type=_wei, help="credits (deposit, reserve, release-request)")
    parser.add_argument("--deployment", default=None, help="deployment file (default: the configured one)")
    args = parser.parse_args(argv)
    key = args.key or (args.key_file.read_text().strip() if args.key_file else None)
    if not key:
        parser.error("give the client's key with --key or --key-file")
    if args.action in ("reserve", "release-request", "release") and not args.node:
        parser.error(f"{args.action} needs --node ADDRESS (the node the reserve is for)")
    if args.action in ("deposit", "reserve", "release-request") and args.amount is None:
        parser.error(f"{args.action} needs --amount CREDITS")
    try:
        chain = Chain.from_deployment(args.deployment)
        me = Account.from_key(key).address
        if args.action == "deposit":
            chain.deposit(key, args.amount)
        elif args.action == "reserve":
            free = chain.escrow_balance(me)
            if free < args.amount:
                print(
                    f"nectar escrow: {free / 1e18:g} credits free in escrow; deposit more first (nectar escrow deposit)"
                )
                return 1
            chain.reserve(key, args.node, args.amount)
        elif args.action == "release-request":
            chain.request_reserve_release(key, args.node, args.amount)
        elif args.action == "release":
            chain.release_reserve(key, args.node)
    except (ChainError, DeploymentNotFound, FileNotFoundError, ValueError) as exc:
        print(f"nectar escrow {args.action}: {exc}")
        return 1
    print(f"client {me}: {chain.escrow_balance(me) / 1e18:g} credits free in escrow")
    if args.node:
        r = chain.reserve_of(me, args.node)
        line = f"reserve for {args.node}: {r['amount'] / 1e18:g} credits"
        if r["pendingRelease"]:
            line += f", {r['pendingRelease'] / 1e18:g} releasing at {r['releaseAt']} (unix time)"
        print(line)
    return 0
