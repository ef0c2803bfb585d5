"""``nectar operator register|stake|unbond|withdraw|status``: a node operator's stake on the NodeRegistry.

The command signs with the node's own key folder (the one ``nectar node`` signs receipts with, found the same way:
``--key-dir``, else ``$NECTAR_HOME/nodes/<--name>``, default ``node``) and registers the folder's libp2p peer id, so
clients can check that the peer announcing the address is the one its owner registered. It reads the folder without
claiming it, so it runs next to a live node. Every write prints what it will do and asks before sending (``--yes``
for scripts), then prints the resulting state.

Only registered nodes with at least the registry's ``minStake`` bonded earn (issue 20): clients that pay through a
ledger route only to them, the ledger refuses vouchers to others, and ``nectar node --ledger-url`` refuses to start
otherwise. Stake being unbonded no longer counts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nectar.cli_kit import add_logging_options, setup_logging

WEI = 10**18
GAS_RESERVE = 10**15  # wei of ETH below which an account cannot pay for a few transactions


class OperatorError(Exception):
    """A refusal with what to do next; the command prints it and exits 1."""


# ---------------------------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class NodeKeys:
    key_dir: Path
    private_key: str
    address: str
    peer_id: str
    created: bool  # the folder had no keys yet: they were made now (the node will use them)


def node_key_dir(key_dir: str | Path | None = None, name: str | None = None) -> Path:
    """The folder ``nectar node`` with the same ``--key-dir``/``--name`` uses (``node`` when neither is given: the
    first node of the machine; a second node is ``--name node-2``)."""
    from nectar.paths import nectar_home

    if key_dir:
        return Path(key_dir).expanduser()
    return nectar_home() / "nodes" / (name or "node")


def load_node_keys(key_dir: Path) -> NodeKeys:
    """The folder's Ethereum key and peer id, made as the node would make them if the folder has none yet."""
    from eth_account import Account

    from nectar.node.identity import load_or_create_eth_key, load_or_create_p2p_identity
    from nectar.wire.identity import peer_id_of

    created = not (key_dir / "eth.json").exists() or not (key_dir / "p2p.key").exists()
    private_key = load_or_create_eth_key(key_dir / "eth.json")
    peer_id = peer_id_of(load_or_create_p2p_identity(key_dir / "p2p.key")).to_base58()
    if not private_key.startswith("0x"):
        private_key = "0x" + private_key
    return NodeKeys(key_dir, private_key, Account.from_key(private_key).address, peer_id, created)


# ---------------------------------------------------------------------------------------------------- amounts
def parse_credits(text: str) -> int:
    """Credits as a decimal number of whole credits ("100", "0.5") -> wei."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise OperatorError(f"{text!r} is not an amount of credits (e.g. 100 or 0.5)") from None
    wei = value * WEI
    if value <= 0 or wei != wei.to_integral_value():
        raise OperatorError(f"{text!r}: give a positive amount of credits with at most 18 decimals")
    return int(wei)


def credits(wei: int) -> str:
    text = f"{Decimal(wei) / WEI:f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + " credits"


def when(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------------------------------------------- state
def node_state(chain, keys: NodeKeys) -> dict:
    info = chain.node_info(keys.address)
    min_stake = int(chain.registry.functions.minStake().call())
    now = chain.w3.eth.get_block("latest")["timestamp"]
    return {
        **info,
        "address": keys.address,
        "keyPeerId": keys.peer_id,
        "minStake": min_stake,
        "now": now,
        "earnings": chain.node_balance(keys.address),
        "credits": chain.credit_balance(keys.address),
        "eth": chain.eth_balance(keys.address),
        "openCases": int(chain.slashing.functions.openCases(keys.address).call()),
        "eligible": info["registered"] and info["bonded"] >= max(min_stake, 1) and info["peerId"] == keys.peer_id,
    }


def describe(state: dict) -> list[str]:
    lines = [
        f"node address:  {state['address']}",
        f"peer id:       {state['keyPeerId']}",
    ]
    if not state["registered"]:
        lines.append("registered:    no")
    else:
        peer = "this key folder's" if state["peerId"] == state["keyPeerId"] else f"{state['peerId']} (STALE)"
        lines.append(
            f"registered:    yes, under {peer} peer id"
            if state["peerId"] == state["keyPeerId"]
            else f"registered:    yes, under peer id {peer}"
        )
    lines.append(f"bonded stake:  {credits(state['bonded'])} (minimum {credits(state['minStake'])})")
    if state["unbonding"]:
        ready = "withdrawable now" if state["now"] >= state["unlockAt"] else f"unlocks {when(state['unlockAt'])}"
        lines.append(f"unbonding:     {credits(state['unbonding'])}, {ready}")
    else:
        lines.append("unbonding:     none")
    lines.append(f"earnings:      {credits(state['earnings'])} settled, not withdrawn")
    lines.append(f"wallet:        {credits(state['credits'])}, {Decimal(state['eth']) / WEI:f} ETH for gas")
    cases = state["openCases"]
    lines.append(f"open cases:    {cases}" + (" (unbonding is frozen until they close)" if cases else ""))
    if state["eligible"]:
        lines.append("earning:       yes: clients paying through a ledger of this deployment route to this node")
    else:
        lines.append("earning:       NO: " + _why_not(state))
    return lines


def _why_not(state: dict) -> str:
    if not state["registered"]:
        return "not registered; run `nectar operator register`"
    if state["bonded"] < max(state["minStake"], 1):
        missing = max(state["minStake"], 1) - state["bonded"]
        return f"bonded stake below the minimum; run `nectar operator stake --amount {credits(missing).split()[0]}`"
    return "registered under another peer id; run `nectar operator register` to update it"


# ---------------------------------------------------------------------------------------------------- actions
def _check_gas(state: dict) -> None:
    if state["eth"] < GAS_RESERVE:
        raise OperatorError(
            f"{state['address']} has {Decimal(state['eth']) / WEI:f} ETH, not enough for gas: send it some ETH "
            "(on a devnet: `cast send --value 1ether ...` from a funded account)"
        )


def _check_credits(state: dict, amount: int) -> None:
    if state["credits"] < amount:
        raise OperatorError(
            f"not enough credits: {state['address']} holds {credits(state['credits'])}, staking needs "
            f"{credits(amount)}. Transfer credits to it (on a devnet, the Credits faucet mints them)"
        )


def plan_register(state: dict, stake: int | None) -> tuple[str, list[str]]:
    """(action, lines describing it); action is "register", "set_peer_id", "add_stake" or "none"."""
    if state["registered"]:
        if state["peerId"] != state["keyPeerId"]:
            return "set_peer_id", [f"update the registered peer id {state['peerId']} -> {state['keyPeerId']}"]
        if state["bonded"] < max(state["minStake"], 1):
            raise OperatorError(
                f"already registered, but bonded stake {credits(state['bonded'])} is below the minimum "
                f"{credits(state['minStake'])}: run `nectar operator stake --amount ...`"
            )
        return "none", ["already registered with enough stake under this peer id: nothing to do"]
    amount = state["minStake"] if stake is None else stake
    if amount < max(state["minStake"], 1):
        raise OperatorError(
            f"below minimum stake: {credits(amount)} < {credits(state['minStake'])}; pass --stake "
            f"{credits(state['minStake']).split()[0]} or more"
        )
    _check_credits(state, amount)
    return "register", [f"register {state['address']} with peer id {state['keyPeerId']}, bonding {credits(amount)}"]


def _translate(error) -> OperatorError:
    """A contract revert, as the operator should read it."""
    name, args = getattr(error, "error_name", None), getattr(error, "error_args", {}) or {}
    if name == "UnbondLocked":
        return OperatorError(f"unbond locked until {when(int(args.get('unlockAt', 0)))}: try again then")
    if name == "UnbondFrozen":
        return OperatorError(
            "an open slash case freezes unbonding: the stake stays until the case is finalized or dismissed"
        )
    if name == "StakeBelowMinimum":
        return OperatorError(f"below minimum stake: {credits(int(args.get('minimum', 0)))} at least")
    if name == "InsufficientStake":
        return OperatorError(
            f"cannot unbond {credits(int(args.get('requested', 0)))}: only {credits(int(args.get('bonded', 0)))} "
            "is bonded"
        )
    if name == "NotRegistered":
        return OperatorError("this node is not registered: run `nectar operator register` first")
    if name == "NothingUnbonding":
        return OperatorError("nothing is unbonding: run `nectar operator unbond --amount ...` first")
    return OperatorError(str(error))


def register(chain, keys: NodeKeys, stake: int | None = None) -> str:
    """Registers (or re-points the peer id of) the node; the action taken."""
    action, _ = plan_register(node_state(chain, keys), stake)
    return _send_register(chain, keys, action, stake)


def _send_register(chain, keys: NodeKeys, action: str, stake: int | None) -> str:
    if action == "register":
        amount = stake if stake is not None else int(chain.registry.functions.minStake().call())
        chain.register_node(keys.private_key, keys.peer_id, amount)
    elif action == "set_peer_id":
        chain.set_peer_id(keys.private_key, keys.peer_id)
    return action


def ensure_registered(chain, key_dir: Path, *, stake: int | None = None, funder_key: str | None = None) -> NodeKeys:
    """For fixtures and the demo: the key folder's node registered with ``stake`` (default: the minimum) under its
    peer id; ``funder_key`` (a devnet account) first gives it ETH for gas and credits to stake when it lacks them."""
    keys = load_node_keys(Path(key_dir))
    state = node_state(chain, keys)
    need = stake if stake is not None else state["minStake"]
    if funder_key is not None:
        if state["eth"] < 10 * GAS_RESERVE:
            chain.send_eth(funder_key, keys.address, 10**18)
        if not state["registered"] and state["credits"] < need:
            chain.faucet(keys.address, need - state["credits"], private_key=funder_key)
        state = node_state(chain, keys)
    if state["registered"] and state["bonded"] < max(state["minStake"], 1):
        chain.add_stake(keys.private_key, max(state["minStake"], 1) - state["bonded"])
        state = node_state(chain, keys)
    action, _ = plan_register(state, stake)
    _send_register(chain, keys, action, stake)
    return keys


# ---------------------------------------------------------------------------------------------------- the command
def _confirm(args, lines: list[str]) -> bool:
    for line in lines:
        print(f"will: {line}")
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise OperatorError("not confirmed: pass --yes to confirm without a terminal")
    return input("proceed? [y/N] ").strip().lower() in ("y", "yes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nectar operator",
        description="A node operator's stake on the NodeRegistry, signed with the node's own key folder. Only nodes "
        "registered with the minimum stake earn through a ledger.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--key-dir", default=None, help="the node's key folder (as `nectar node --key-dir`)")
    common.add_argument(
        "--name", default=None, help="the node's name (as `nectar node --name`): key folder $NECTAR_HOME/nodes/NAME"
    )
    common.add_argument("--deployment", default=None, help="deployment file (default: $NECTAR_DEPLOYMENT)")
    common.add_argument("--rpc-url", default=None, help="overrides the deployment's RPC URL")
    common.add_argument("--yes", "-y", action="store_true", help="do not ask before sending (scripts)")
    add_logging_options(common, default="WARNING")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("register", parents=[common], help="register the node and bond its stake")
    p.add_argument("--stake", default=None, help="credits to bond (default: the registry's minimum)")
    p = sub.add_parser("stake", parents=[common], help="bond more stake")
    p.add_argument("--amount", required=True, help="credits to add")
    p = sub.add_parser("unbond", parents=[common], help="start unbonding stake (it stops counting at once)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--amount", help="credits to unbond")
    group.add_argument("--all", action="store_true", help="unbond all bonded stake")
    p = sub.add_parser("withdraw", parents=[common], help="take back matured unbonded stake and settled earnings")
    p.add_argument("--what", choices=("all", "stake", "earnings"), default="all", help="(default: all)")
    sub.add_parser("status", parents=[common], help="registration, stake, unbonding, earnings, open cases")
    p = sub.add_parser(
        "records", parents=[common], help="the node's own records at an API gateway (a request signed by its key)"
    )
    p.add_argument("--api-url", required=True, help="the gateway, e.g. http://127.0.0.1:8800")
    p.add_argument("--what", choices=NODE_RECORDS, default="earnings", help="(default: earnings)")
    return parser


NODE_RECORDS = ("receipts", "earnings", "settlements", "reputation")


def node_records(api_url: str, private_key: str, what: str = "earnings", *, timeout: float = 30.0) -> dict:
    """A node's ``what`` from an API gateway, asked with a request signed by the node's key (the gateway answers a
    node only about itself)."""
    import httpx
    from eth_account import Account

    from nectar.wire.request_auth import GATEWAY_PATH, sign_request

    base = api_url.rstrip("/")
    try:  # the signature names the gateway, so no other deployment accepts it
        found = httpx.get(base + GATEWAY_PATH, timeout=timeout)
        gateway = found.json()["gateway_id"] if found.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise OperatorError(f"could not read {base}{GATEWAY_PATH} ({e}): is --api-url a Nectar API gateway?") from None
    if not isinstance(gateway, str):
        raise OperatorError(
            f"{base}{GATEWAY_PATH} answered {found.status_code}: {found.text[:300]}; is --api-url a Nectar API gateway "
            "of this version?"
        )
    path = f"/v1/nodes/{Account.from_key(private_key).address}/{what}"
    try:
        headers = sign_request(private_key, "GET", path, gateway=gateway)
    except ValueError as e:
        raise OperatorError(f"{base} gave a malformed gateway id: {e}") from None
    response = httpx.get(base + path, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise OperatorError(f"{api_url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    try:
        return _run(args)
    except OperatorError as e:
        print(f"nectar operator {args.action}: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from nectar.chain import Chain, ChainError, DeploymentNotFound

    key_dir = node_key_dir(args.key_dir, args.name)
    if args.action == "records":  # the gateway, not the chain
        if not (key_dir / "eth.json").exists():
            raise OperatorError(f"no node key in {key_dir}: pass the node's --name or --key-dir")
        import json

        print(json.dumps(node_records(args.api_url, load_node_keys(key_dir).private_key, args.what), indent=2))
        return 0
    try:
        chain = Chain.from_deployment(args.deployment, rpc_url=args.rpc_url)
        if not chain.is_connected():
            raise OperatorError(f"the chain at {chain.rpc_url} does not answer (is `nectar devnet` running?)")
    except DeploymentNotFound as e:
        raise OperatorError(str(e)) from None
    keys = load_node_keys(key_dir)
    print(f"key folder:    {key_dir}" + (" (keys created now; `nectar node` will use them)" if keys.created else ""))
    state = node_state(chain, keys)
    try:
        done = _act(args, chain, keys, state)
    except ChainError as e:
        raise _translate(e) from None
    if done:
        print("done. now:")
    for line in describe(node_state(chain, keys)):
        print(f"  {line}" if done else line)
    return 0


def _act(args, chain, keys: NodeKeys, state: dict) -> bool:
    """Carries out the action; True if it sent anything."""
    if args.action == "status":
        return False
    if args.action == "register":
        stake = parse_credits(args.stake) if args.stake is not None else None
        action, lines = plan_register(state, stake)
        if action == "none":
            print(lines[0])
            return False
        _check_gas(state)
        if not _confirm(args, lines):
            raise OperatorError("cancelled")
        _send_register(chain, keys, action, stake)
        return True
    if args.action == "stake":
        amount = parse_credits(args.amount)
        if not state["registered"]:
            raise OperatorError("this node is not registered: run `nectar operator register` (it bonds the stake)")
        _check_credits(state, amount)
        _check_gas(state)
        if not _confirm(args, [f"bond {credits(amount)} more (bonded: {credits(state['bonded'] + amount)})"]):
            raise OperatorError("cancelled")
        chain.add_stake(keys.private_key, amount)
        return True
    if args.action == "unbond":
        return _unbond(args, chain, keys, state)
    return _withdraw(args, chain, keys, state)


def _unbond(args, chain, keys: NodeKeys, state: dict) -> bool:
    if not state["registered"]:
        raise OperatorError("this node is not registered: nothing to unbond")
    amount = state["bonded"] if args.all else parse_credits(args.amount)
    if amount == 0:
        raise OperatorError("nothing is bonded")
    if amount > state["bonded"]:
        raise OperatorError(f"cannot unbond {credits(amount)}: only {credits(state['bonded'])} is bonded")
    if state["openCases"]:
        raise OperatorError(
            f"{state['openCases']} open slash case(s) freeze unbonding: the stake stays until they are finalized "
            "or dismissed"
        )
    _check_gas(state)
    delay = int(chain.registry.functions.unbondDelay().call())
    left = state["bonded"] - amount
    lines = [
        f"unbond {credits(amount)}: withdrawable from about {when(state['now'] + delay)} "
        f"(`nectar operator withdraw`); it stops counting as stake now"
    ]
    if state["unbonding"]:
        lines.append(f"the {credits(state['unbonding'])} already unbonding joins it, and its timer restarts")
    if left < max(state["minStake"], 1):
        lines.append(
            f"bonded stake falls to {credits(left)}, below the minimum {credits(state['minStake'])}: this node stops "
            "earning (clients stop routing to it, the ledger refuses its vouchers)"
        )
    if not _confirm(args, lines):
        raise OperatorError("cancelled")
    chain.request_unbond(keys.private_key, amount)
    return True


def _withdraw(args, chain, keys: NodeKeys, state: dict) -> bool:
    lines, stake, earnings = [], False, False
    if args.what in ("all", "stake"):
        if state["unbonding"] and state["now"] >= state["unlockAt"]:
            if state["openCases"]:
                raise OperatorError(
                    "an open slash case freezes unbonding: the stake stays until the case is finalized or dismissed"
                )
            lines.append(f"take back {credits(state['unbonding'])} of unbonded stake")
            stake = True
        elif state["unbonding"]:
            message = f"unbond locked until {when(state['unlockAt'])}: {credits(state['unbonding'])} is unbonding"
            if args.what == "stake" or not state["earnings"]:
                raise OperatorError(message)
            print(f"note: {message}")
        elif args.what == "stake":
            raise OperatorError("nothing is unbonding: run `nectar operator unbond --amount ...` first")
    if args.what in ("all", "earnings"):
        if state["earnings"]:
            lines.append(f"withdraw {credits(state['earnings'])} of settled earnings")
            earnings = True
        elif args.what == "earnings":
            raise OperatorError("no settled earnings to withdraw yet (the ledger settles at each epoch's end)")
    if not lines:
        raise OperatorError("nothing to withdraw: no matured unbonding stake and no settled earnings")
    _check_gas(state)
    if not _confirm(args, lines):
        raise OperatorError("cancelled")
    if stake:
        chain.unbond(keys.private_key)
    if earnings:
        chain.withdraw_earnings(keys.private_key)
    return True
