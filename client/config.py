"""Client settings in one dataclass (Petals' ClientConfig shape)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ClientConfig:
    initial_peers: Sequence[str] = ()  # multiaddrs of swarm peers (or NECTAR_INITIAL_PEERS)
    request_timeout: float = 60.0  # s, one forward/backward RPC
    step_timeout: float = 60.0  # s, one inference step at one hop
    connect_timeout: float = 10.0  # s, opening a session at one hop
    max_retries: int = 8  # route failures tolerated per step before giving up
    min_backoff: float = 0.5  # s, first ban of a failing peer
    max_backoff: float = 60.0  # s, longest ban of a failing peer
    update_period: float = 30.0  # s, how stale the cached swarm view may get
    hop_cost: float = 0.005  # s, latency assumed for a hop until its round trip is measured
    private_key: str | None = None  # hex Ethereum key that signs vouchers; None = a fresh throwaway key
    direct: bool = True  # use a node's announced direct TCP lane when it answers (else its P2P address)
    push: bool = False  # each hop pushes its output straight to the next hop's direct lane (issue 6); else relay
    push_timeout: float = 1.0  # s a pushed hop may take to answer after the previous hop did before the client relays
    push_misses: int = 3  # consecutive steps relayed for a missing push before a session stops asking for pushes
    verify_receipts: bool = True  # check each receipt's signer, commitments and amount
    voucher_interval: float = 0.25  # s a voucher to a node may be reused while what it leaves unpaid stays under a
    # quarter of the node's announced credit limit (signing costs ~0.1 ms a step, and as much to check); 0 = a fresh
    # voucher whenever more is owed
    receipts_ride: bool = True  # a node may send a step's receipt in the next step's answer where that round serves
    # other sessions (one message a step instead of two); else each comes alone
    show_route: bool = False  # log the route chosen for each session
    quant: str = ""  # weight quantizations routes may use, comma separated (none,int8,nf4: what nodes announce,
    # and their receipts commit to); empty = any
    ledger_url: str | None = None  # `nectar ledger` whose reputation scores routing reads (ReputationScorer)
    countersign: bool = True  # with ledger_url: countersign each receipt accepted and post it to the ledger (in the
    # background), so nodes' work is on record even if they withhold it; it is what makes their work count
    require_stake: bool | None = None  # route only to nodes registered with the minimum stake on the deployment the
    # ledger settles on (the stake gate); None = on when ledger_url is set. --no-require-stake for a private swarm
    stake_weight: float = 0.5  # how strongly bonded stake lowers a node's route cost (concave, capped at 16x the
    # minimum stake: at most 2x cheaper); 0 ignores stake
