"""Concurrent inference sessions from several clients share forwards on a real node process, exactly.

One node (its own process, on 127.0.0.1) hosts all 4 blocks of a tiny Llama with GQA. Several client threads run
sessions in lock step (a barrier before each step, so their steps reach the node together) with different prompt
lengths, batch sizes and a mid-session replay. The node gathers each round's sessions (``--batch-wait``): without it,
batching depends on steps arriving while a round computes, which a tiny model's sub-millisecond rounds make a matter
of luck on a loaded machine. Every output must equal an unbatched local computation within 1e-5, and the node's log
must show that steps were really batched.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.node.backend import SpanBackend
from nectar.node.local_swarm import LocalSwarm
from tests.swarm.info import node_compute_counters

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("speed-swarm")) as swarm:
        swarm.add_node(
            tiny_llama,
            blocks=(0, 4),
            name="batcher",
            extra_args=[
                "--throughput",
                "100",
                "--announce-period",
                "2",
                "--num-threads",
                "1",
                "--batch-wait",
                "1",
                "--device",
                "cpu",
                "--dtype",
                "float32",
            ],
        )  # as the reference
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


@pytest.fixture(scope="module")
def model(swarm, tiny_llama):
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, config=ClientConfig(step_timeout=30, connect_timeout=15)
    )
    yield model
    model.shutdown()


def _plan(hidden: int, *, seed: int, batch_size: int, prefill: int, steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [prefill] + [1 + (i % 3 == 2) for i in range(steps)]  # decodes, with a 2-token step now and then
    return [torch.randn(batch_size, size, hidden, generator=generator) for size in sizes]


def test_concurrent_sessions_are_batched_and_exact(swarm, model, tiny_llama):
    hidden = model.head.embedding_dim
    specs = [
        dict(batch_size=1, prefill=5),
        dict(batch_size=2, prefill=3),
        dict(batch_size=1, prefill=1),
        dict(batch_size=1, prefill=8),
        dict(batch_size=3, prefill=2),
        dict(batch_size=1, prefill=4),
    ]
    steps = 10
    plans = [_plan(hidden, seed=i, steps=steps, **spec) for i, spec in enumerate(specs)]
    replay_at, replay_session = 6, 0  # this session rolls back to position 2 at that round and goes on from there
    replay_input = torch.randn(1, 2, hidden, generator=torch.Generator().manual_seed(99))
    outputs: list[list[torch.Tensor]] = [[] for _ in specs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(specs))
    receipts_before, counters_before = len(model.wallet.receipts), node_compute_counters(model)

    def client(index: int) -> None:
        try:
            with model.inference_session(max_length=40, batch_size=specs[index]["batch_size"]) as session:
                for round_index, hidden_states in enumerate(plans[index]):
                    barrier.wait(timeout=60)
                    if index == replay_session and round_index == replay_at:
                        session.position = 2  # as the client does after a failure: resend from an earlier position
                        outputs[index].append(("replay", session.step(replay_input)))
                    outputs[index].append(("step", session.step(hidden_states)))
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors

    reference = SpanBackend(tiny_llama, 0, 4, dtype=torch.float32, device="cpu", show_progress=False, batching=False)
    worst = 0.0
    for index, spec in enumerate(specs):
        caches = reference.new_caches(0, 4, spec["batch_size"], 40)
        position, plan = 0, iter(plans[index])
        for kind, got in outputs[index]:
            inputs = replay_input if kind == "replay" else next(plan)
            if kind == "replay":
                position = 2
            expected = reference.inference_step(inputs, caches, start=0, end=4, position=position)
            position += inputs.shape[1]
            worst = max(worst, (got - expected).abs().max().item())
    assert worst <= TOLERANCE, worst

    batch_sizes = [int(n) for n in re.findall(r"Batched (\d+) inference steps", swarm.nodes[0].log())]
    assert batch_sizes and max(batch_sizes) >= 2, "the node never batched concurrent steps"
    # every step's receipt came and passed the client's checks; in shared rounds, riding in the next answer
    assert len(model.wallet.receipts) - receipts_before == sum(len(steps) for steps in outputs)
    riding = node_compute_counters(model)["receipts_riding"] - counters_before["receipts_riding"]
    assert 0 < riding < sum(len(steps) for steps in outputs)


def test_the_node_keeps_serving_after_concurrent_sessions(model):
    torch.manual_seed(5)
    ids = torch.randint(3, 1000, (1, 5))
    first = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert first.tolist() == model.generate(ids, max_new_tokens=6, do_sample=False).tolist()


def _signing_children(swarm) -> list:
    import psutil

    node = psutil.Process(swarm.nodes[0].process.pid)
    return [p for p in node.children(recursive=True) if "nectar.node.signing" in " ".join(p.cmdline())]


def test_info_counts_steps_and_loop_time_and_a_child_process_signs(swarm, model):
    before = node_compute_counters(model)
    model.generate(torch.randint(3, 1000, (1, 4)), max_new_tokens=5, do_sample=False)
    after = node_compute_counters(model)
    assert after["inference_steps"] - before["inference_steps"] >= 5  # a prefill and four decodes at least
    assert after["loop_cpu_seconds"] > before["loop_cpu_seconds"] > 0
    signers = _signing_children(swarm)
    assert len(signers) == 1 and signers[0].is_running()
    assert "signed on the node's event loop" not in swarm.nodes[0].log()  # the child signed every receipt


def test_the_node_signs_on_its_loop_once_its_signing_child_dies(swarm, model):
    (signer,) = _signing_children(swarm)
    signer.kill()
    for _ in range(100):  # the node notices at once, on its event loop, and reaps its child
        if not signer.is_running():
            break
        time.sleep(0.1)
    assert not signer.is_running()
    ids = torch.randint(3, 1000, (1, 4))
    before = len(model.wallet.receipts)
    first = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert first.tolist() == model.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    assert len(model.wallet.receipts) - before == 12  # every step of both generations, each receipt verified
    assert "signed on the node's event loop from now on: the signing process stopped" in swarm.nodes[0].log()
