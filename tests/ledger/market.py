"""The whole market for tests, as ``nectar demo`` runs it: a devnet (Anvil + contracts), ``nectar ledger`` and
``nectar worker`` (SQLite database and broker), and a LocalSwarm of priced ``nectar node`` processes serving a tiny
random Llama, each node signing with a devnet node account (its key dir's eth.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from nectar.ledger import crud
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.local_swarm import LocalSwarm, SwarmProcess
from nectar.operator import ensure_registered
from nectar.service.db import get_engine, session_scope
from nectar.wire.eip712 import receipt_leaf
from tests.ledger.harness import LedgerDeployment
from tests.ledger.utils import Party, wait_for

NUM_BLOCKS = 4


class SwarmMarket:
    """:param home: working folder (logs of every process land here)
    :param price: credit wei per token per block every node asks"""

    def __init__(self, home: Path, *, price: int, model_name: str = "tiny-market-llama"):
        self.home, self.price = home, price
        self.deployment = LedgerDeployment(
            home, database_url=f"sqlite:///{home / 'ledger.db'}", broker_url=f"sqla+sqlite:///{home / 'broker.db'}"
        )
        self.chain = self.deployment.chain
        self.model_path = save_tiny_checkpoint(home / model_name, "llama", num_layers=NUM_BLOCKS, hidden_size=64)
        self.model_name = model_name
        self.swarm = LocalSwarm(workdir=home / "swarm", env={"NECTAR_DEPLOYMENT": str(self.deployment.deployment_path)})
        self.engine = get_engine(self.deployment.database_url)
        accounts = self.chain.deployment.accounts
        self.node_keys = [a["privateKey"] for a in accounts if a["role"] == "node"]
        self.clients = self.deployment.clients
        self.registered: dict[str, str] = {}  # address -> peer id of the nodes registered by ``add_node``

    @property
    def url(self) -> str:
        return self.deployment.url

    def add_node(
        self,
        name: str,
        blocks: tuple[int, int],
        *,
        account: int | None = None,
        extra_args: tuple[str, ...] = (),
        register: bool = True,
    ) -> SwarmProcess:
        """A node on devnet node account ``account`` (None: a fresh key, unknown to the ledger), registered with the
        minimum stake under its peer id as `nectar operator register` does (``register=False``: an unstaked node,
        which then needs ``--allow-unstaked`` in ``extra_args`` to start)."""
        key_dir = self.swarm.workdir / "keys" / name
        if account is not None:
            key_dir.mkdir(parents=True, exist_ok=True)
            party = Party(self.node_keys[account])
            (key_dir / "eth.json").write_text(
                json.dumps({"address": party.address, "private_key": self.node_keys[account]})
            )
        args = [
            "--price",
            str(self.price),
            "--ledger-url",
            self.url,
            "--throughput",
            "100",
            "--num-threads",
            "1",
            "--announce-period",
            "3",
            "--dtype",
            "float32",
            *extra_args,
        ]
        if register:
            keys = ensure_registered(self.chain, key_dir, funder_key=self.chain.default_key())
            self.registered[keys.address.lower()] = keys.peer_id
        return self.swarm.add_node(str(self.model_path), blocks=blocks, name=name, extra_args=args)

    def fund(self, client: Party, amount: int) -> None:
        """Deposits ``amount`` into ``client``'s escrow and reserves a share of it for each node running now, as the
        demo and the API gateway do: nodes work only against escrow they checked (issue 22), and a deposit alone
        could pay any node, or leave."""
        key = "0x" + bytes(client.key).hex() if not isinstance(client.key, str) else client.key
        self.chain.deposit(key, amount)
        nodes = [n.eth_address for n in self.swarm.nodes if n.eth_address]
        for node in nodes:
            self.chain.reserve(key, node, amount // (len(nodes) + 1))

    def wait_for_swarm(self, min_nodes: int = 1) -> None:
        """Blocks served, and the ledger's stake table (cached for seconds) shows every registered node under its
        live peer id: a gated client routes by that table."""
        self.swarm.wait_for_blocks(str(self.model_path), NUM_BLOCKS, timeout=120, min_nodes=min_nodes)
        from nectar.wire.ledger_api import LedgerClient

        min_stake = self.chain.deployment.params["min_stake"]
        expected = []  # registered nodes the chain says are eligible under their live peer id now
        for address, peer in self.registered.items():
            info = self.chain.node_info(address)
            if info["registered"] and info["peerId"] == peer and int(info["bonded"]) >= min_stake:
                expected.append((address, peer))
        with LedgerClient(self.url) as ledger:
            deadline = time.monotonic() + 30
            while True:
                table = ledger.stakes()
                stale = [a for a, peer in expected if not (table.get(a) and table.get(a).eligible_for(peer))]
                if not stale:
                    return
                assert time.monotonic() < deadline, f"the ledger's stake table never showed {stale}"
                time.sleep(0.5)

    def client_model(self, client: Party, **kwargs):
        from nectar.client import ClientConfig, DistributedModelForCausalLM

        key = "0x" + bytes(client.key).hex()
        return DistributedModelForCausalLM.from_pretrained(
            str(self.model_path),
            initial_peers=self.swarm.initial_peers,
            private_key=key,
            config=kwargs.pop("config", None) or ClientConfig(),
            **kwargs,
        )

    # ---- what reached the ledger ------------------------------------------------------------------------------

    def stored_leaves(self, client: str) -> set[bytes]:
        with session_scope(self.engine) as session:
            return {r.leaf for r in crud.list_receipts(session, limit=1_000_000) if r.client == client}

    def stored_vouchers(self, client: str) -> dict[str, int]:
        """node -> highest cumulative amount the ledger holds from ``client``."""
        with session_scope(self.engine) as session:
            return {v.node: v.cumulative_amount for v in crud.list_vouchers(session, client=client)}

    def wait_for_payments(self, wallet, timeout: float = 90) -> None:
        """Nodes forward receipts and vouchers from a background thread: wait until the ledger has all of them."""
        leaves = {receipt_leaf(r.receipt) for r in wallet.receipts}
        owed = Counter()
        for r in wallet.receipts:
            owed[r.receipt.node] += r.receipt.amount
        wait_for(
            lambda: (
                leaves <= self.stored_leaves(wallet.address)
                and all(self.stored_vouchers(wallet.address).get(n, 0) >= a for n, a in owed.items())
            ),
            timeout,
            f"the nodes to forward {len(leaves)} receipts and vouchers for {dict(owed)}",
        )

    def close_and_settle(self) -> dict:
        closed = self.deployment.close_epoch()["closed"]
        assert closed is not None, "nothing to close: the nodes' receipts did not reach the ledger"
        return self.deployment.wait_settled(closed["number"])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every swarm process at once (each takes seconds to leave the DHT), SIGKILL what is left."""
        processes = [p.process for p in self.swarm.nodes + ([self.swarm.bootstrap] if self.swarm.bootstrap else [])]
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(10)
        self.deployment.stop()
        self.engine.dispose()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


__all__ = ["SwarmMarket", "NUM_BLOCKS", "time"]
