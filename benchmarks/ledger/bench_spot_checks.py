"""Spot checks per second over a live swarm: the inputs from the node's audit RPC, re-executed either on other nodes
(forward RPC, ``SwarmVerifier``) or on spans loaded by the ledger (``LocalVerifier``), and the cost of each part.

A local market without chain: ``nectar ledger`` (SQLite), a bootstrap peer and three nodes serving all blocks of a
tiny random Llama; a client generates, the epoch is closed in the database, then every receipt is checked (q = 1).

    python benchmarks/ledger/bench_spot_checks.py [--sessions 6] [--tokens 16] [--hidden 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ledger.utils: ports and process helpers

from nectar.client import ClientConfig, DistributedModelForCausalLM  # noqa: E402
from nectar.client.routing import PeerScorer  # noqa: E402
from nectar.ledger import crud  # noqa: E402
from nectar.ledger.core.config import Settings  # noqa: E402
from nectar.ledger.spot_check import LocalVerifier, SpotChecker  # noqa: E402
from nectar.ledger.swarm import SwarmView  # noqa: E402
from nectar.ledger.swarm_audit import RpcAuditSource, SwarmVerifier  # noqa: E402
from nectar.models.tiny import save_tiny_checkpoint  # noqa: E402
from nectar.node.local_swarm import LocalSwarm  # noqa: E402
from nectar.service.db import get_engine, session_scope  # noqa: E402
from nectar.wire.eip712 import address_of  # noqa: E402
from tests.ledger.utils import free_port, start_nectar, wait_for, wait_http  # noqa: E402

VERIFIER_CLIENT = "0x" + "ab" * 20
VERIFIER_KEY = "0x" + "cd" * 32  # signs the audit calls (nodes answer registered verifiers only)


class Prefer(PeerScorer):
    def __init__(self, address: str):
        self.address = address

    def cost_factor(self, peer_id, info) -> float:
        return 0.01 if info.eth_address == self.address else 1.0


def timed(fn, items) -> tuple[float, list]:
    began = time.perf_counter()
    out = [fn(item) for item in items]
    return time.perf_counter() - began, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-spot-"))
    os.environ["NECTAR_HOME"] = str(home)
    model = save_tiny_checkpoint(home / "bench-spot-llama", "llama", num_layers=4, hidden_size=args.hidden)
    url = f"sqlite:///{home / 'ledger.db'}"
    env = {
        "NECTAR_LEDGER_DATABASE_URL": url,
        "NECTAR_LEDGER_BROKER_URL": f"sqla+sqlite:///{home / 'broker.db'}",
        "NECTAR_LEDGER_DEPLOYMENT_PATH": str(home / "none.json"),
    }
    port = free_port()
    ledger = start_nectar("ledger", ["--port", str(port), "--log-level", "warning"], env, home / "ledger.log")
    swarm = LocalSwarm(workdir=home / "swarm")
    client = view = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process=ledger)
        print(f"[bench] swarm: 3 nodes x blocks 0:4 of a Llama with hidden size {args.hidden} ...", flush=True)
        nodes = [
            swarm.add_node(
                str(model),
                blocks=(0, 4),
                name=f"node{i}",
                extra_args=[
                    "--ledger-url",
                    f"http://127.0.0.1:{port}",
                    "--throughput",
                    "100",
                    "--num-threads",
                    "1",
                    "--dtype",
                    "float32",
                    "--audit-verifiers",
                    address_of(VERIFIER_KEY),  # no chain here: name the verifier that may audit
                ],
            )
            for i in range(3)
        ]
        swarm.wait_for_blocks(str(model), 4, min_nodes=3, timeout=120)
        client = DistributedModelForCausalLM.from_pretrained(
            str(model), initial_peers=swarm.initial_peers, config=ClientConfig(), scorer=Prefer(nodes[0].eth_address)
        )
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.sessions):
            client.generate(torch.randint(3, 1000, (1, 8), generator=generator), max_new_tokens=args.tokens)
        receipts = len(client.wallet.receipts)
        engine = get_engine(url)

        def stored() -> int:
            with session_scope(engine) as session:
                return crud.count_receipts(session, node=nodes[0].eth_address)

        wait_for(lambda: stored() >= receipts, 60, "the node to forward its receipts")
        with session_scope(engine) as session:
            epoch = crud.close_epoch(session).number
            ids = [r.id for r in crud.list_receipts(session, epoch=epoch, limit=100_000)]
        print(
            f"[bench] {receipts} receipts of {args.sessions} sessions x {args.tokens} tokens; checking all of them",
            flush=True,
        )

        settings = Settings(database_url=url, spot_check_fraction=1.0, deployment_path=home / "none.json")
        view = SwarmView(swarm.initial_peers)
        audit = RpcAuditSource(view, key=VERIFIER_KEY)
        with session_scope(engine) as session:
            signed = [crud.signed_receipt_of(session.get(crud.Receipt, i)) for i in ids]
        audit_s, histories = timed(lambda s: audit.input_history(s.receipt), signed)
        swarm_verifier = SwarmVerifier(view, rank=0, client=VERIFIER_CLIENT)
        local_verifier = LocalVerifier({model.name: model}, name="local")
        forward_s, _ = timed(
            lambda pair: swarm_verifier.execute(pair[0].receipt, pair[1]), list(zip(signed, histories))
        )
        local_verifier.execute(signed[0].receipt, histories[0])  # load the span once, outside the timing
        local_s, _ = timed(lambda pair: local_verifier.execute(pair[0].receipt, pair[1]), list(zip(signed, histories)))

        results = {}
        for name, verifiers in (
            ("swarm verifiers", [SwarmVerifier(view, rank=r, client=VERIFIER_CLIENT) for r in (0, 1)]),
            ("local verifiers", [local_verifier, LocalVerifier({model.name: model}, name="local-b")]),
        ):
            checker = SpotChecker(settings=settings, engine=engine, verifiers=verifiers, audit=audit)
            elapsed, verdicts = timed(checker.check_receipt, ids)
            results[name] = (len(ids) / elapsed, sum(v.status == "passed" for v in verdicts))
        n = len(ids)
        print(f"audit RPC (inputs of one step):          {1000 * audit_s / n:8.1f} ms/step")
        print(f"forward RPC re-execution on another node: {1000 * forward_s / n:8.1f} ms/step")
        print(f"local span re-execution in the ledger:    {1000 * local_s / n:8.1f} ms/step")
        for name, (rate, passed) in results.items():
            print(f"full spot checks, {name}:      {rate:8.1f} checks/s  ({passed}/{n} passed)")
        ratio = results["local verifiers"][0] / results["swarm verifiers"][0]
        print(f"local / swarm verifier throughput:        {ratio:8.2f}x (the swarm path needs no model in the ledger)")
    finally:
        if view is not None:
            view.shutdown()
        if client is not None:
            client.shutdown()
        swarm.close()
        ledger.terminate()
        ledger.wait(30)


if __name__ == "__main__":
    main()
