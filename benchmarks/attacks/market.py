"""The real market the attack benchmark runs in by default: Anvil with the contracts deployed and ``nectar ledger`` on
SQLite, started once for the whole run (``tests.ledger.market.SwarmMarket``, as the market tests do); each row gets a
fresh swarm (bootstrap peer and DHT) whose honest node runs on devnet node account 0, registered and staked under its
peer id (the key dir is kept between rows, so the peer id and the registration are too), and a fresh honest client
funded with escrow and a reserve for that node. Attackers use throwaway keys with no escrow, as in reality.

Epochs are closed and settled in this process (``EpochSettler``, what ``nectar worker`` runs on its schedule): the
ledger row closes them while it attacks and counts what the closes did."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.ledger: the market harness of the swarm tests

from tests.ledger.market import NUM_BLOCKS, SwarmMarket  # noqa: E402
from tests.ledger.utils import Party, make_voucher  # noqa: E402

PRICE = 10**12  # credit wei per token per block
STEP = PRICE * NUM_BLOCKS  # one token through the whole span
CREDIT_LIMIT = 2000 * STEP  # the node's cap per verified client; what it grants is further capped by the reserve
DEPOSIT, RESERVE = 10**18, 10**17  # the honest client's escrow and its reserve for the node (25 000 tokens)
ETHER = 10**18


class Market:
    def __init__(self, home: Path):
        import os

        self.market = SwarmMarket(home, price=PRICE, model_name="attack-market-llama")
        os.environ["NECTAR_DEPLOYMENT"] = str(self.market.deployment.deployment_path)  # client children read it
        self.market.deployment.start_ledger()
        self.chain, self.url = self.market.chain, self.market.url
        self.model_path = Path(self.market.model_path)
        self.swarm_dir = home / "swarm"
        self._settler = None

    @property
    def deployment(self):
        return self.market.deployment

    def new_swarm(self, env: dict):
        """A fresh DHT for a row (what one row's sybils stored must not reach the next); the node keys persist."""
        from nectar.node.local_swarm import LocalSwarm

        deployment_env = {"NECTAR_DEPLOYMENT": str(self.deployment.deployment_path)}
        self.market.swarm = LocalSwarm(workdir=self.swarm_dir, env={**env, **deployment_env}, start_timeout=300)
        self.market.registered = {}
        return self.market.swarm

    def add_honest_node(self, extra_args: list[str]):
        node = self.market.add_node("honest", (0, NUM_BLOCKS), account=0, extra_args=tuple(extra_args))
        self.market.wait_for_swarm()
        return node

    def funded_client(self) -> Party:
        """A fresh client with gas, tokens, escrow and a reserve for the row's node (``nectar escrow`` deposit and
        reserve, through the chain client)."""
        client = Party()
        self.chain.send_eth(self.chain.default_key(), client.address, ETHER)
        self.chain.faucet(client.address, 10 * DEPOSIT)
        key = "0x" + bytes(client.key).hex()
        self.chain.deposit(key, DEPOSIT)
        for node in self.market.swarm.nodes:
            if node.eth_address:
                self.chain.reserve(key, node.eth_address, RESERVE)
        return client

    def settler(self):
        if self._settler is None:
            from nectar.ledger.core.config import Settings
            from nectar.ledger.settlement import EpochSettler
            from nectar.service.db import get_engine

            settings = Settings(
                database_url=self.deployment.database_url, deployment_path=self.deployment.deployment_path
            )
            self._settler = EpochSettler(settings, get_engine(settings.database_url), self.chain)
        return self._settler

    def ledger_counts(self) -> dict[str, int]:
        """Epochs no longer collecting, failed settlements (a batch the chain skipped any voucher of is recorded
        ``failed``, its other vouchers paid), and settled vouchers paid and skipped, in the ledger's database."""
        from nectar.ledger import crud
        from nectar.ledger.models import EpochStatus, Settlement, SettlementItem, SettlementStatus
        from nectar.service.db import get_engine, session_scope

        with session_scope(get_engine(self.deployment.database_url)) as session:
            closed = len([e for e in crud.list_epochs(session, limit=100_000) if e.status != EpochStatus.COLLECTING])
            failed = session.query(Settlement).filter(Settlement.status == SettlementStatus.FAILED).count()
            paid = session.query(SettlementItem).filter(SettlementItem.status == "paid").count()
            skipped = session.query(SettlementItem).filter(SettlementItem.status == "skipped").count()
            return {"epochs_closed": closed, "failed_settlements": failed, "paid": paid, "skipped": skipped}

    def end_row(self) -> None:
        self.market.swarm.close()

    def stop(self) -> None:
        self.market.stop()


class LedgerAttack(threading.Thread):
    """The ledger row (issue 22 item 6), from an outsider with throwaway keys and no escrow: ``unfunded`` vouchers
    signed by fresh clients to the honest node, submitted once; ``bodies`` bodies of ``mib`` MiB sent chunked (no
    Content-Length); then an epoch close (and settlement) every ``period`` s until stopped, as the worker's schedule
    does. Before the fix one unfunded voucher closed a new epoch and failed a settlement at every close."""

    def __init__(self, market: Market, node_eth: str, *, unfunded=3, bodies=3, mib=40, period=2.0):
        super().__init__(daemon=True)
        self.market, self.node = market, SimpleNamespace(address=node_eth)
        self.unfunded, self.bodies, self.mib, self.period = unfunded, bodies, mib, period
        self.stop_event = threading.Event()
        self.stats: dict = {"body_status": {}, "vouchers_accepted": 0, "closes": 0}
        self.error: str | None = None

    def _chunked(self):
        yield b'{"receipts": ['
        chunk = b" " * (1 << 20)  # JSON whitespace: a valid body if the ledger parsed it all
        for _ in range(self.mib):
            yield chunk
        yield b"]}"

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # the benchmark reports it and goes on
            self.error = f"{type(e).__name__}: {e}"[:300]

    def _run(self) -> None:
        url, stats = self.market.url, self.stats
        self.market.settler().run(close=True)  # settles what earlier rows' honest clients owe: this row counts its own
        self.start_counts = self.market.ledger_counts()
        domain = self.market.deployment.domain
        with httpx.Client(base_url=url, timeout=60) as h:
            vouchers = [
                make_voucher(Party(), self.node, 5 * 10**15, domain=domain).to_json() for _ in range(self.unfunded)
            ]
            response = h.post("/v1/vouchers", json={"vouchers": vouchers})
            stats["vouchers_accepted"] = response.json().get("accepted", 0) if response.status_code == 200 else 0
            for _ in range(self.bodies):
                if self.stop_event.is_set():
                    break
                try:
                    response = h.post(
                        "/v1/receipts", content=self._chunked(), headers={"content-type": "application/json"}
                    )
                    key = str(response.status_code)
                except httpx.HTTPError as e:
                    key = f"error {type(e).__name__}"
                stats["body_status"][key] = stats["body_status"].get(key, 0) + 1
        series = []
        while not self.stop_event.is_set():
            self.market.settler().run(close=True)
            stats["closes"] += 1
            series.append(self.market.ledger_counts())
            self.stop_event.wait(self.period)
        self.series = series

    def report(self) -> dict:
        self.stop_event.set()
        self.join(60)
        stats = dict(self.stats)
        if self.error:
            stats["errors"] = self.error
        series, start = getattr(self, "series", []), getattr(self, "start_counts", None)
        if start is not None and series:
            # over the row (the honest client's vouchers close epochs too, paid), then what the closes after the first
            # did: the unfunded vouchers are tried (skipped on chain, retired) at the first close only
            for key in ("epochs_closed", "failed_settlements", "skipped", "paid"):
                stats[key] = series[-1][key] - start[key]
            for key in ("epochs_closed", "failed_settlements", "skipped"):
                stats[f"{key}_after_first"] = series[-1][key] - series[0][key]
        refused = stats["body_status"].get("413", 0)
        sent = sum(stats["body_status"].values())
        stats["outcome"] = (
            f"refused: {refused}/{sent} chunked {self.mib} MiB bodies answered 413"
            if sent and refused == sent
            else "succeeded"
        )
        return stats
