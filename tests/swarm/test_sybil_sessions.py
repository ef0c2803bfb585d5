"""Sybils that look fast and fail sessions (issue 22): each answers pings at once, over P2P and on a direct lane on
its own P2P host, and accepts every inference open; two then black-hole every step, one answers every step with an
error. Each has its own peer id and a fresh Ethereum key proven by a signature over that id, and claims the whole
model at throughput 1e9 and price 0. No ledger: the stake gate is off (``require_stake`` is on only with a ledger,
``--no-require-stake`` otherwise), as in a private swarm, so the sybils are routed to without stake.

A client must learn from the sessions they failed: its first generation pays at most one try per sybil (a step
timeout for each black hole) and still finishes; once the sybils' bans are over and they answer a fresh ping faster
than the honest node, the next generations go to the honest node, which has served steps, and open no sybil session.

One real swarm: a bootstrap peer, one honest node serving all 4 blocks of the tiny model (direct lane on), three
sybil peers (real hivemind DHT peers with their own P2P daemons) served from this process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import threading
import time

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.client.routing import sequence_manager
from nectar.node.identity import load_or_create_p2p_identity
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.announce import AnnouncementValidator
from nectar.wire.direct import DirectServer
from nectar.wire.event_loop import new_event_loop
from nectar.wire.messages import InfoReply, Opened
from nectar.wire.protocol import RPC_INFERENCE, RPC_INFO, ErrorCode, NodeRPCError
from nectar.wire.transport import serve_stream
from tests.swarm.test_sybil_routing import _record, _store

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

MODEL, BLOCKS = "tiny-llama", 4
PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])
STEP_TIMEOUT, CONNECT_TIMEOUT = 8.0, 4.0
# s: the first generation (client start included) tries each sybil at most once: a step timeout per black hole, an
# instant error for the other, plus the honest work (about 10 s on 2 loaded cores)
FIRST_BOUND = 2 * STEP_TIMEOUT + 40.0


class AnsweringSybil:
    """One sybil identity: a DHT peer whose P2P daemon and direct lane answer ``rpc_info`` with its record at once and
    accept every inference open, then never answer a step (``mode="hole"``) or answer it with an error."""

    def __init__(self, initial_peers: list[str], key_path, mode: str):
        self.mode, self.opens, self.steps = mode, 0, 0
        key = load_or_create_p2p_identity(key_path)
        self.dht = hivemind.DHT(
            initial_peers=initial_peers,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            identity_path=str(key_path),
            check_if_identity_free=False,
            record_validators=[AnnouncementValidator(key)],
            start=True,
        )
        self.peer = self.dht.peer_id
        self.loop = new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.lane = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(60)
        self.record = _record(self.peer, "0x" + secrets.token_hex(32), lane=self.lane)

    async def _serve(self) -> str:
        self.p2p = await self.dht.replicate_p2p()
        handlers = {RPC_INFO: self._info, RPC_INFERENCE: self._inference}
        for name, handler in handlers.items():
            await serve_stream(self.p2p, name, handler)
        self.direct = DirectServer(handlers, local_id=self.p2p.peer_id)
        return f"127.0.0.1:{await self.direct.start('127.0.0.1')}"

    async def _info(self, requests, context):
        async for _ in requests:
            yield InfoReply(self.record).to_response()
            return

    async def _inference(self, requests, context):
        opened = False
        async for _ in requests:
            if not opened:
                opened, self.opens = True, self.opens + 1
                yield Opened(cache_tokens_left=10**9, session_nonce=os.urandom(32)).to_response()
                continue
            self.steps += 1
            if self.mode == "error":
                raise NodeRPCError(ErrorCode.INTERNAL, "out of order, try again")
            await asyncio.sleep(3600)  # a black hole: the stream stays open, no answer ever comes

    async def _close(self) -> None:
        await self.direct.close()
        await self.p2p.shutdown()

    def announce(self) -> None:
        _store(self.dht, self.peer, self.record)

    def shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.dht.shutdown()


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), direct=True) as swarm:
        swarm.add_node(tiny_llama, blocks=(0, BLOCKS), name="honest", extra_args=["--throughput", "100"])
        swarm.wait_for_blocks(tiny_llama, BLOCKS)
        yield swarm


def _attacker(initial_peers, key_dir, modes, opens, ready, stop) -> None:
    """The attacker's process (its own, so its answers are as fast as it can make them): the sybils, re-announced
    every 5 s until ``stop``; ``opens[i]`` counts the inference sessions sybil ``i`` accepted."""
    found = [AnsweringSybil(initial_peers, f"{key_dir}/{i}.key", mode) for i, mode in enumerate(modes)]
    ready.put([sybil.peer.to_base58() for sybil in found])
    while not stop.is_set():
        for i, sybil in enumerate(found):
            opens[i] = sybil.opens
            if time.monotonic() - getattr(sybil, "announced", 0) > 5:
                try:
                    sybil.announce()
                    sybil.announced = time.monotonic()
                except Exception:
                    logger.warning("A sybil store failed", exc_info=True)
        stop.wait(0.2)
    for sybil in found:
        sybil.shutdown()


class Attacker:
    def __init__(self, swarm, key_dir, modes):
        context = multiprocessing.get_context("spawn")
        self.opens, self.stop, ready = context.Array("i", len(modes)), context.Event(), context.Queue()
        self.process = context.Process(
            target=_attacker, args=(swarm.initial_peers, str(key_dir), modes, self.opens, ready, self.stop)
        )
        self.process.start()
        self.peers = {PeerID.from_base58(p) for p in ready.get(timeout=120)}

    def total_opens(self) -> int:
        time.sleep(0.5)  # the attacker publishes its counts every 0.2 s
        return sum(self.opens[:])

    def shutdown(self) -> None:
        self.stop.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


@pytest.fixture(scope="module")
def sybils(swarm, tmp_path_factory):
    """Three sybils: two black holes, one that answers errors."""
    attacker = Attacker(swarm, tmp_path_factory.mktemp("sybils"), ["hole", "hole", "error"])
    yield attacker
    attacker.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval().generate(PROMPT, max_new_tokens=4, do_sample=False)


def _generate(model) -> tuple[list, float]:
    began = time.monotonic()
    tokens = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    return tokens.tolist(), time.monotonic() - began


def test_a_client_learns_to_avoid_sybils_that_answer_pings_and_fail_sessions(
    swarm, sybils, tiny_llama, expected, monkeypatch
):
    peers = sybils.peers
    began = time.monotonic()
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama,
        initial_peers=swarm.initial_peers,
        config=ClientConfig(step_timeout=STEP_TIMEOUT, connect_timeout=CONNECT_TIMEOUT, update_period=1.0),
    )
    manager = model.sequence_manager
    started = time.monotonic() - began
    try:
        deadline = time.monotonic() + 60
        while not peers <= set(manager.servers().get(0, {})):  # the client sees every sybil before it generates
            assert time.monotonic() < deadline, "the sybil records never became visible"
            time.sleep(1)
        tokens, first = _generate(model)
        first += started  # client start included (not the wait for the records to spread)
        assert tokens == expected.tolist()
        tried = sybils.total_opens()
        latencies = {str(p)[-6:]: round(manager.latency(p) * 1000, 2) for p in manager.servers()[0]}
        logger.warning(
            f"First generation facing 3 sybils: {first:.1f}s (client start included), {tried} sybil opens; "
            f"pings (ms) {latencies}"
        )
        assert first < FIRST_BOUND
        assert all(count <= 1 for count in sybils.opens[:])  # each sybil cost at most one try

        # to keep the test short, banned sybils are pinged again as soon as their bans end (not REPING_AFTER later)
        monkeypatch.setattr(sequence_manager, "REPING_AFTER", 1.0)
        for later in range(2):
            deadline = time.monotonic() + 3 * STEP_TIMEOUT
            while any(manager.is_banned(p) for p in peers):  # wait out the sybils' bans...
                assert time.monotonic() < deadline
                time.sleep(0.5)
            time.sleep(1.5)
            manager.update(force=True)  # ...and let them answer a fresh ping (faster than the honest node's)
            assert all(p in manager._latency for p in peers), "the sybils should answer pings"
            opens = sybils.total_opens()
            tokens, elapsed = _generate(model)
            assert tokens == expected.tolist()
            new_opens = sybils.total_opens() - opens
            latencies = {str(p)[-6:]: round(manager.latency(p) * 1000, 2) for p in manager.servers()[0]}
            logger.warning(f"Generation {later + 2}: {elapsed:.1f}s, {new_opens} sybil opens; pings (ms) {latencies}")
            assert new_opens == 0, "the client tried a sybil that failed it before"
    finally:
        model.shutdown()
