"""Gas per settled receipt, amortised over an epoch, on a real Anvil.

An epoch of R receipts from C clients x N nodes costs one commitEpochRoot plus ceil(C*N / batch) settle()
transactions, whatever R is; the figure printed is that total gas / R for several epoch sizes.

    python benchmarks/ledger/bench_gas.py
"""

from __future__ import annotations

import os
import tempfile

from eth_account import Account

from nectar.chain.devnet import start_devnet
from nectar.wire import eip712
from nectar.wire import receipts as R
from nectar.wire.merkle import merkle_root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    state = tempfile.mkdtemp()
    devnet = start_devnet(port=free_port(), state_dir=state, deployment_path=os.path.join(state, "deployment.json"))
    try:
        chain = devnet.chain()
        accounts = chain.deployment.accounts
        ledger_key = next(a["privateKey"] for a in accounts if a["role"] == "ledger")
        clients = [a["privateKey"] for a in accounts if a["role"] == "client"]
        nodes = [a["address"] for a in accounts if a["role"] == "node"]
        for key in clients:
            chain.deposit(key, 10**22)
        domain = chain.eip712_domain()
        cumulative = {}
        print(f"{'receipts/epoch':>15} {'vouchers':>9} {'root gas':>9} {'settle gas':>11} {'gas/receipt':>12}")
        for epoch, receipts in enumerate([1_000, 10_000, 100_000, 1_000_000], start=1):
            leaves = [os.urandom(32) for _ in range(min(receipts, 1000))]  # root cost does not depend on R
            root_gas = chain.commit_epoch_root(ledger_key, epoch, merkle_root(leaves), receipts).gas_used
            pairs = []
            for key in clients:
                client = Account.from_key(key).address
                for node in nodes:
                    cumulative[(client, node)] = cumulative.get((client, node), 0) + receipts * 10**9
                    voucher = R.Voucher(client, node, 1, cumulative[(client, node)])
                    pairs.append((voucher.to_message(), eip712.sign_voucher(voucher, key, domain).signature))
            settle_gas = chain.settle(ledger_key, pairs).gas_used
            per_receipt = (root_gas + settle_gas) / receipts
            print(f"{receipts:>15,} {len(pairs):>9} {root_gas:>9,} {settle_gas:>11,} {per_receipt:>12.2f}")
        print("target: <= 50 gas per settled receipt")
    finally:
        devnet.stop()


if __name__ == "__main__":
    main()
