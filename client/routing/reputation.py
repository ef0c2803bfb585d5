"""``ReputationScorer``: route costs from the ledger's reputation scores and the nodes' announced prices.

The ledger publishes a score in [0, 1] per node at ``GET /v1/reputation``, read through ``nectar.wire.ledger_api`` (so
the client does not depend on the ledger package). A background thread refreshes the scores; ``cost_factor`` only
reads memory.

cost factor = reputation factor * price factor, where

- reputation factor = (NEUTRAL_SCORE / max(score, min_score)) ** reputation_weight: a node at the neutral score keeps
  its speed-based cost, a trusted one gets cheaper, a slashed one (score near 0) becomes hundreds of times dearer;
- price factor = (1 + price_weight * price / reference) / (1 + price_weight), where reference is the median price
  announced by the peers seen so far (or ``reference_price``): a node at the median price keeps its cost.

- stake factor = ``scoring.stake_factor``: 1 at the registry's minimum stake, down to 0.5 at 16x it (concave, capped).

The stake gate (``require_stake``, on by default for a client paying through a ledger): routes use only peers whose
announced Ethereum address is registered on the ledger's deployment with at least the minimum bonded stake, under
the very peer id that announces it (``GET /v1/stakes``). The registration is a transaction signed by the address, so
a peer cannot borrow a staked node's address by announcing it: its own peer id is not the registered one. Until the
table has been read once, no peer passes (fail closed).

Nodes the ledger does not know, or flags ``new`` (few receipts) without any failed spot check or slash, get the
neutral score. So that they can earn a reputation at all, each new node is also "explored" with probability
``exploration``: for that draw its factor is multiplied by about ``explore_bonus`` and routes go through it.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time

import httpx
from hivemind.p2p import PeerID

from nectar.client.routing.scoring import STAKE_WEIGHT, PeerScorer, stake_factor
from nectar.wire.announce import ServerInfo
from nectar.wire.ledger_api import (
    PREFIX,
    REPUTATION,
    STAKES,
    LedgerClient,
    LedgerError,
    NodeReputation,
    NodeStake,
    StakeTable,
)

logger = logging.getLogger(__name__)

NEUTRAL_SCORE = 0.5  # what a node without history scores; the ledger's smoothed components start here too


class ReputationScorer(PeerScorer):
    """Prefers reputable, cheap nodes; keeps a share of routes for new ones. Thread-safe.

    :param ledger_url: base URL of ``nectar ledger`` (e.g. ``http://127.0.0.1:8700``)
    :param refresh_period: seconds between fetches of ``/v1/reputation``
    :param exploration: probability that a new node is preferred in a draw (its chance to build a reputation)
    :param explore_bonus: factor applied to an explored new node (small: routes go through it)
    :param decision_window: seconds one exploration draw is held, so one route computation sees one decision
      (a routing layer that calls ``begin_route()`` gets a fresh draw per route instead)
    :param reputation_weight: exponent of the reputation factor (0 ignores reputation)
    :param price_weight: how strongly price counts against speed (0 ignores price)
    :param reference_price: credit wei per token per block that counts as "normal" (None: median of seen peers)
    :param min_score: scores are clipped to this before dividing, which bounds a node's factor
    :param timeout: seconds per HTTP request to the ledger
    :param seed: for reproducible exploration draws
    :param require_stake: the stake gate: route only to peers registered with the minimum stake (see above)
    :param stake_weight: how strongly bonded stake lowers a peer's cost (``scoring.stake_factor``; 0 ignores stake)
    """

    def __init__(
        self,
        ledger_url: str,
        *,
        refresh_period: float = 60.0,
        exploration: float = 0.1,
        explore_bonus: float = 0.05,
        decision_window: float = 0.05,
        reputation_weight: float = 1.0,
        price_weight: float = 1.0,
        reference_price: int | None = None,
        min_score: float = 1e-3,
        timeout: float = 5.0,
        seed: int | None = None,
        require_stake: bool = False,
        stake_weight: float = STAKE_WEIGHT,
    ):
        if not 0.0 <= exploration <= 1.0:
            raise ValueError(f"exploration must be a probability in [0, 1], got {exploration}")
        self.ledger_url = ledger_url.rstrip("/")
        self.refresh_period, self.exploration, self.explore_bonus = refresh_period, exploration, explore_bonus
        self.decision_window, self.reputation_weight, self.price_weight = (
            decision_window,
            reputation_weight,
            price_weight,
        )
        self.reference_price, self.min_score = reference_price, min_score
        self._ledger = LedgerClient(self.ledger_url, timeout=timeout)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._scores: dict[str, NodeReputation] = {}
        self._fetched_at: float | None = None
        self._prices: dict[PeerID, int] = {}
        self._draws: dict[PeerID, tuple[float, float]] = {}  # peer -> (drawn at, bonus: 1.0 or ~explore_bonus)
        self.require_stake, self.stake_weight = require_stake, stake_weight
        self._stakes: StakeTable | None = None
        self._stakes_tried = 0.0
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self.refresh()  # one synchronous try, so the first route already uses scores when the ledger is up
        self._thread = threading.Thread(target=self._loop, name="reputation-refresh", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config, **kwargs) -> ReputationScorer:
        """From ``ClientConfig.ledger_url``, ``require_stake`` (None: on) and ``stake_weight``."""
        if not config.ledger_url:
            raise ValueError("ClientConfig.ledger_url is not set: pass the URL of `nectar ledger` to score peers")
        kwargs.setdefault("require_stake", config.require_stake is not False)
        kwargs.setdefault("stake_weight", config.stake_weight)
        return cls(config.ledger_url, **kwargs)

    # ---- scores from the ledger -------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Fetch the scores and stakes now; on failure keep the last ones (or neutral scores) and say so."""
        stakes = self.refresh_stakes()
        try:
            scores = self._ledger.reputation_scores()
        except (httpx.HTTPError, LedgerError, ValueError, KeyError, TypeError) as e:
            logger.warning(
                f"Could not read reputation from {self.ledger_url}{PREFIX}{REPUTATION} ({type(e).__name__}: "
                f"{e}); routing on the last scores known (or speed and price alone) until the ledger "
                "answers"
            )
            return False
        with self._lock:
            self._scores, self._fetched_at = scores, time.monotonic()
        return stakes

    def refresh_stakes(self) -> bool:
        """Fetch the registry table now; on failure keep the last one (none yet: the gate lets nobody through)."""
        if not self.require_stake and self.stake_weight == 0:
            return True
        self._stakes_tried = time.monotonic()
        try:
            table = self._ledger.stakes()
        except (httpx.HTTPError, LedgerError, ValueError, KeyError, TypeError) as e:
            gate = "no peer passes the stake gate" if self._stakes is None else "routing on the last stakes known"
            logger.warning(
                f"Could not read stakes from {self.ledger_url}{PREFIX}{STAKES} ({type(e).__name__}: {e}); {gate} "
                "until the ledger answers"
            )
            return False
        with self._lock:
            self._stakes = table
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_period):
            try:
                self.refresh()
            except Exception:  # never let the thread die: routing would silently keep stale scores forever
                logger.warning("Reputation refresh failed", exc_info=True)

    def reputation(self, eth_address: str) -> NodeReputation | None:
        return self._scores.get(eth_address.lower())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ledger.close()

    # ---- cost factor ------------------------------------------------------------------------------------------

    def begin_route(self) -> None:
        """Draw exploration anew for the next route (for routing layers that announce each route computation); with
        the gate on and no stake table yet (the ledger was down), try to read it again, at most every 5 s."""
        with self._lock:
            self._draws.clear()
        if self.require_stake and self._stakes is None and time.monotonic() - self._stakes_tried > 5.0:
            self.refresh_stakes()

    def is_new(self, eth_address: str) -> bool:
        known = self.reputation(eth_address)
        return known is None or (known.new and not known.penalized)

    def _exploration_bonus(self, peer_id: PeerID) -> float:
        """1.0, or (with probability ``exploration``) about ``explore_bonus``; the bonus is jittered so that when
        several new nodes are explored at once the tie goes to a random one, not always to the same."""
        now = time.monotonic()
        with self._lock:
            drawn = self._draws.get(peer_id)
            if drawn is None or now - drawn[0] > self.decision_window:
                explored = self._rng.random() < self.exploration
                bonus = self.explore_bonus * self._rng.uniform(0.5, 1.5) if explored else 1.0
                drawn = self._draws[peer_id] = (now, bonus)
            return drawn[1]

    def _price_factor(self, peer_id: PeerID, price: int) -> float:
        if self.price_weight == 0:
            return 1.0
        with self._lock:
            self._prices[peer_id] = price
            reference = self.reference_price
            if reference is None:
                positive = [p for p in self._prices.values() if p > 0]
                reference = statistics.median(positive) if positive else 0
        if reference <= 0:
            return 1.0  # everyone is free: price says nothing
        return (1.0 + self.price_weight * price / reference) / (1.0 + self.price_weight)

    # ---- the stake gate ---------------------------------------------------------------------------------------

    def stake(self, eth_address: str) -> NodeStake | None:
        table = self._stakes
        return None if table is None else table.get(eth_address)

    def ineligible_reason(self, peer_id: PeerID, info: ServerInfo) -> str:
        if self._stakes is None:
            return f"the stake table of {self.ledger_url} could not be read yet"
        stake = self.stake(info.eth_address)
        if stake is None:
            return f"{info.eth_address} is not registered"
        return stake.problem(str(peer_id)) or ""

    def eligible(self, peer_id: PeerID, info: ServerInfo) -> bool:
        if not self.require_stake:
            return True
        stake = self.stake(info.eth_address)
        if stake is not None and stake.eligible_for(str(peer_id)):
            return True
        key = f"{peer_id}:{info.eth_address}"
        if key not in self._warned:  # once per peer: the route error says it again if it matters
            self._warned.add(key)
            logger.info(f"Not routing to {peer_id} ({info.eth_address}): {self.ineligible_reason(peer_id, info)}")
        return False

    def _stake_factor(self, info: ServerInfo) -> float:
        stake = self.stake(info.eth_address)
        if stake is None or not stake.eligible or self.stake_weight == 0:
            return 1.0
        return stake_factor(stake.bonded, stake.min_stake, weight=self.stake_weight)

    def cost_factor(self, peer_id: PeerID, info: ServerInfo) -> float:
        known = self.reputation(info.eth_address)
        new = known is None or (known.new and not known.penalized)
        score = NEUTRAL_SCORE if new else known.score
        factor = (NEUTRAL_SCORE / max(score, self.min_score)) ** self.reputation_weight
        factor *= self._price_factor(peer_id, max(int(info.price_per_token), 0))
        factor *= self._stake_factor(info)
        if new and self.exploration > 0:
            factor *= self._exploration_bonus(peer_id)
        return factor


__all__ = ["ReputationScorer", "NodeReputation", "NEUTRAL_SCORE"]
