"""What client authentication (issue 22) costs: signing an open or call on the client, verifying it on the node
(``ClientGate.client_of``: skew check, signer recovery, nonce set), per request. An inference session pays it once
per open; forward/backward calls pay it per call.

    python benchmarks/bench_client_auth.py [--n 2000]
"""

from __future__ import annotations

import argparse
import time

import torch
from eth_account import Account

from nectar.node.receipts import ClientGate
from nectar.wire.messages import ForwardCall, Open


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    n = parser.parse_args().n
    key, node, peer = Account.create().key, Account.create().address, "12D3KooWExamplePeerIdForTheBenchmark"
    gate = ClientGate(node)
    x = torch.randn(1, 1, 64)
    for name, make in (
        ("open", lambda: Open("m[0:4]", b"s" * 16, 128)),
        ("forward call", lambda: ForwardCall("m[0:4]", x, session_id=b"s" * 16, step=1)),
    ):
        messages = [make() for _ in range(n)]
        began = time.perf_counter()
        signed = [m.signed(key, node=node, peer_id=peer) for m in messages]
        sign_us = (time.perf_counter() - began) / n * 1e6
        decoded = [type(m).decode(m.to_request()) for m in signed]
        began = time.perf_counter()
        for m in decoded:
            gate.client_of(m, peer)
        verify_us = (time.perf_counter() - began) / n * 1e6
        print(f"{name:13s} sign (client) {sign_us:7.1f} us   verify (node) {verify_us:7.1f} us   (n={n})")


if __name__ == "__main__":
    main()
