"""A node's backend with a LoRA adapter: rounds that mix sessions with and without it stay exact, the fused fast
path never computes an adapter's step without it, and kept training graphs are not shared across adapters."""

from __future__ import annotations

import pytest
import torch
from eth_account import Account

from nectar.models.tiny import save_tiny_checkpoint, save_tiny_lora
from nectar.node.backend import SpanBackend
from nectar.node.receipts import ReceiptSigner
from nectar.wire import eip712
from nectar.wire.fingerprints import ComputeSpec, fingerprint_hash
from nectar.wire.receipts import ReceiptKind

pytest.importorskip("peft")
HIDDEN = 64


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-backend")
    path = save_tiny_checkpoint(root / "tiny-llama", "llama")
    adapters = [save_tiny_lora(root / "style-a", path, seed=1), save_tiny_lora(root / "style-b", path, seed=2)]
    options = dict(dtype=torch.float32, device="cpu", show_progress=False, adapters=adapters)
    return SpanBackend(path, 0, 4, **options), SpanBackend(path, 0, 4, batching=False, **options)


def _inputs(seed: int, steps: int) -> torch.Tensor:
    return torch.randn(1, 4 + steps, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _decode(backend, adapters: list, seeds: list[int], steps: int = 3) -> list[torch.Tensor]:
    """Sessions (one per entry of ``adapters``, inputs from ``seeds``) prefilled alone, then decoded together."""
    inputs = [_inputs(seed, steps) for seed in seeds]
    caches = [backend.new_caches(0, 4, 1, 16) for _ in adapters]
    outputs = [[] for _ in adapters]
    for i, adapter in enumerate(adapters):
        prefill = inputs[i][:, :4]
        outputs[i].append(backend.inference_step(prefill, caches[i], start=0, end=4, position=0, adapter=adapter))
    for step in range(steps):
        tokens = [inputs[i][:, 4 + step : 5 + step] for i in range(len(adapters))]
        tasks = [
            backend.inference_task(tokens[i], caches[i], start=0, end=4, position=4 + step, adapter=adapter)
            for i, adapter in enumerate(adapters)
        ]
        for i, output in enumerate(backend.run_inference(tasks)):  # one mixed round, as a worst case
            outputs[i].append(output)
    return [torch.cat(out, dim=1) for out in outputs]


def test_mixed_rounds_are_exact(backends):
    batched, generic = backends
    assert batched.batch_runner is not None and generic.batch_runner is None
    assert batched.adapters.names == ["style-a", "style-b"]
    sessions = [None, "style-a", None, "style-b", "style-a"]
    seeds = [0, 0, 0, 0, 0]  # the same inputs, so each adapter's sessions agree and differ from the base model's
    mixed = _decode(batched, sessions, seeds)
    for i, adapter in enumerate(sessions):
        (alone,) = _decode(generic, [adapter], [seeds[i]])
        torch.testing.assert_close(mixed[i], alone, atol=1e-4 * alone.abs().max().item(), rtol=0)
    torch.testing.assert_close(mixed[1], mixed[4])
    torch.testing.assert_close(mixed[0], mixed[2])
    assert (mixed[1] - mixed[0]).abs().max() > 1e-2 and (mixed[3] - mixed[1]).abs().max() > 1e-2


def test_tasks_batch_with_their_own_adapter_only(backends):
    batched, _ = backends
    caches = batched.new_caches(0, 4, 1, 8)
    keys = {
        adapter: batched.inference_task(torch.zeros(1, 1, HIDDEN), caches, start=0, end=4, position=0, adapter=adapter)
        for adapter in (None, "style-a", "style-b")
    }
    assert len({task.batch_key for task in keys.values()}) == 3


def test_training_graphs_are_kept_per_adapter(backends):
    batched, generic = backends
    hidden = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(2))
    batched.forward(hidden, start=0, end=4, adapter="style-a")  # keeps its graph for a backward
    fresh, _ = generic.backward(hidden, grad, start=0, end=4)  # the base model's, recomputed
    kept, _ = batched.backward(hidden, grad, start=0, end=4)  # must not take style-a's graph
    torch.testing.assert_close(kept, fresh)
    adapted, _ = batched.backward(hidden, grad, start=0, end=4, adapter="style-a")
    assert (adapted - fresh).abs().max() > 1e-3


def test_receipts_bind_the_adapter_digest():
    digest = bytes(range(32))
    signer = ReceiptSigner(
        private_key=Account.create().key.hex(),
        model_id="m",
        price_per_token=0,
        domain=eip712.make_domain(31337, "0x" + "22" * 20),
    )
    fields = dict(session_id=b"s" * 32, step=0, kind=ReceiptKind.INFERENCE, start=0, end=4, client=signer.address)
    tensors = dict(tokens=2, inputs=torch.zeros(1, 2, 8), outputs=torch.ones(1, 2, 8))

    base_receipt, base_descriptor = signer.sign(**fields, **tensors)
    receipt, descriptor = signer.sign(**fields, **tensors, adapter=digest)
    assert ComputeSpec.decode(descriptor).adapter == digest and not ComputeSpec.decode(base_descriptor).adapter
    assert receipt.receipt.fingerprint == fingerprint_hash(descriptor) != base_receipt.receipt.fingerprint
