"""Cheat catalogue, evasion rows (issue 21, item 3), on a live swarm: a devnet (Anvil + contracts), ``nectar ledger``
and ``nectar worker`` (SQLite), and real ``nectar node`` processes serving a tiny Llama; a client generates through
each node in turn, and the worker audits every step (q = 1) over the swarm (audit RPC, re-execution on other nodes).

The cheats: a node that corrupts every output and refuses the audits of those steps (``--evade-audits``: it says it
has no record); one that corrupts every output and withholds its receipts (no ``--ledger-url``: the client's
countersigned copies are all the ledger gets); and one that signs its receipts for a model id nobody announces
(``--sign-model-as``). Per cheat: the steps the client accepted, the steps on record at the ledger, and the audits'
verdicts; detection per audited step d gives the served steps to a 99% conviction at the default rate q,
ln(0.01) / ln(1 - q d).

    python benchmarks/audit/evasion_live.py --json evasion_live.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from nectar.ledger.models import Receipt
from nectar.operator import ensure_registered
from nectar.service.db import session_scope
from nectar.wire.eip712 import receipt_leaf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ledger: the market harness of the swarm tests
from tests.ledger.market import NUM_BLOCKS, SwarmMarket  # noqa: E402
from tests.ledger.test_swarm_spot_checks import Prefer, wait_for_spot_checks  # noqa: E402
from tests.ledger.utils import Party, wait_for  # noqa: E402

PRICE = 10**12


def withholding_node(market, name: str, key: str, extra_args=()):
    """A staked node that sends nothing to the ledger (no --ledger-url): its receipts never leave it."""
    key_dir = market.swarm.workdir / "keys" / name
    key_dir.mkdir(parents=True, exist_ok=True)
    (key_dir / "eth.json").write_text(json.dumps({"address": Party(key).address, "private_key": key}))
    keys = ensure_registered(market.chain, key_dir, funder_key=market.chain.default_key())
    market.registered[keys.address.lower()] = keys.peer_id
    args = ["--price", str(PRICE), "--throughput", "100", "--num-threads", "1", "--announce-period", "3"]
    args += ["--dtype", "float32", *extra_args]
    return market.swarm.add_node(str(market.model_path), blocks=(0, NUM_BLOCKS), name=name, extra_args=args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2, help="sessions per node")
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--q", type=float, default=0.02)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    began = time.time()
    home = Path(tempfile.mkdtemp(prefix="nectar-evasion-"))
    market = SwarmMarket(home, price=PRICE, model_name="tiny-evasion-llama")
    os.environ["NECTAR_DEPLOYMENT"] = str(market.deployment.deployment_path)
    model = None
    try:
        market.deployment.start_ledger()
        honest = [market.add_node(f"honest-{i}", (0, 4), account=i) for i in range(2)]
        cheats = {
            "refuses the audits of its corrupted steps": market.add_node(
                "evader", (0, 4), account=2, extra_args=("--corrupt-rate", "1.0", "--evade-audits")
            ),
            "withholds its receipts (corrupts every step)": withholding_node(
                market,
                "withholder",
                "0x" + os.urandom(32).hex(),
                ("--corrupt-rate", "1.0", "--trusted-clients", market.clients[0].address),  # no ledger: trusts it
            ),
            "signs a model id nobody announces": market.add_node(
                "liar", (0, 4), extra_args=("--sign-model-as", "a-model-nobody-serves")
            ),
        }
        market.wait_for_swarm(min_nodes=5)
        market.deployment.start_worker(
            audit_source="swarm",
            spot_check_verifier="swarm",
            spot_check_fraction=1.0,
            swarm_initial_peers=market.swarm.initial_peers[0],
            slash_poll_seconds=1,
        )
        client = market.clients[0]
        market.chain.deposit(client.key, 10**18)
        for node in list(cheats.values()):
            market.chain.reserve(client.key, node.eth_address, 10**17)
        from nectar.client import ClientConfig

        prefer = Prefer()
        model = market.client_model(client, scorer=prefer, config=ClientConfig(ledger_url=market.url))
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.sessions):
            for node in list(cheats.values()) + honest:
                prefer.target = node.eth_address
                model.generate(
                    torch.randint(3, 1000, (1, 5), generator=generator), max_new_tokens=args.new_tokens, eos_token_id=[]
                )
        accepted = Counter(r.receipt.node for r in model.wallet.receipts)
        leaves = {receipt_leaf(r.receipt) for r in model.wallet.receipts}
        model.shutdown()  # flushes the countersigned receipts still queued
        model = None
        # every step the client accepted reaches the ledger through the client, the withholder's too
        wait_for(lambda: leaves <= market.stored_leaves(client.address), 120, "the client's receipts at the ledger")
        number = market.close_and_settle()["number"]

        rows = wait_for_spot_checks(market, number, 900)
        with session_scope(market.engine) as session:
            on_record = Counter(r.node for r in session.query(Receipt).filter(Receipt.epoch_number == number))
        results = {}
        for name, node in list(cheats.items()) + [(f"honest node {i}", n) for i, n in enumerate(honest)]:
            mine = [r for r in rows if r["node"] == node.eth_address]
            verdicts = Counter(r["status"] for r in mine)
            d = verdicts["failed"] / len(mine) if mine else 0.0
            steps = math.log(0.01) / math.log(1 - args.q * d) if d > 0 else math.inf
            results[name] = {
                "steps_accepted_by_client": accepted[node.eth_address],
                "steps_on_record": on_record[node.eth_address],
                "verdicts": dict(verdicts),
                "detection_per_audited_step": d,
                "served_steps_to_99pct_conviction": steps,
                "slash_status": sorted({r["slash_status"] for r in mine if r["slash_status"]}),
                "example": next((r["detail"][:160] for r in mine if r["status"] == "failed"), None),
            }
    finally:
        if model is not None:
            model.shutdown()
        market.stop()
    print(
        f"| cheat | steps accepted by the client | on record at the ledger | audits: failed / passed / "
        f"inconclusive | detection per audited step | served steps to 99% at q = {args.q} | case |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        v = r["verdicts"]
        steps = r["served_steps_to_99pct_conviction"]
        print(
            f"| {name} | {r['steps_accepted_by_client']} | {r['steps_on_record']} | {v.get('failed', 0)} / "
            f"{v.get('passed', 0)} / {v.get('inconclusive', 0)} | {r['detection_per_audited_step']:.2f} | "
            f"{'never' if steps == math.inf else f'{steps:,.0f}'} | {', '.join(r['slash_status']) or '-'} |"
        )
    print(f"({time.time() - began:.0f}s; logs in {home})")
    if args.json:
        path = Path(args.json)
        if not path.is_absolute() and len(path.parts) == 1:
            path = Path(__file__).parent.parent / "results" / "audit" / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
