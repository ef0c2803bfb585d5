"""The receipt-signing child process: same receipts as signing in place, errors carried back, and a node that
keeps signing on its event loop once the child is gone."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle

import pytest
import torch
from eth_account import Account

from nectar.node.receipts import ReceiptSigner
from nectar.node.signing import InlineSigning, SigningWorker
from nectar.wire import eip712, fingerprints
from nectar.wire import receipts as schema

DOMAIN = eip712.make_domain(31337, "0x" + "22" * 20)


@pytest.fixture(scope="module")
def signer() -> ReceiptSigner:
    return ReceiptSigner(
        private_key=Account.create().key.hex(),
        model_id="tiny-llama",
        price_per_token=3,
        domain=DOMAIN,
        compute=fingerprints.ComputeSpec("bfloat16", device="cuda"),  # not the default: the child must get it too
    )


def _fields(step: int, inputs: torch.Tensor, outputs: torch.Tensor, client: str = "0x" + "11" * 20) -> dict:
    return dict(
        session_id=b"s" * 32,
        step=step,
        kind=schema.ReceiptKind.INFERENCE,
        start=2,
        end=6,
        client=client,
        tokens=inputs.shape[0] * inputs.shape[1],
        inputs=inputs,
        outputs=outputs,
    )


def _without_timestamp(signed: schema.SignedReceipt) -> dict:
    return {k: v for k, v in signed.receipt.to_json().items() if k != "timestamp"}


async def _with_worker(signer, body):
    worker = SigningWorker(signer)
    worker.spawn()
    await worker.connect()
    try:
        return await body(worker)
    finally:
        await worker.close()


def test_the_child_signs_what_the_node_would_sign_itself(signer):
    tensors = [
        (torch.randn(1, 1, 64), torch.randn(1, 1, 64)),
        (torch.randn(2, 5, 64).half(), torch.randn(2, 5, 64).half()),
        (torch.randn(1, 3, 64).bfloat16(), torch.randn(1, 3, 64).bfloat16()),
        (torch.randn(1, 2, 64), torch.randn(1, 64, 2).transpose(1, 2)),
    ]  # outputs not contiguous

    async def body(worker):
        pending = [worker.prepare(**_fields(step, i, o)).start() for step, (i, o) in enumerate(tensors)]  # all at once
        return [await p.result() for p in pending], [p.signed_here for p in pending], worker.failed

    results, signed_here, failed = asyncio.run(_with_worker(signer, body))
    assert failed is None and not any(signed_here)  # none fell back to the loop
    inline = InlineSigning(signer)
    for step, ((inputs, outputs), (signed, fingerprint, wire)) in enumerate(zip(tensors, results)):
        expected, expected_fingerprint, _ = asyncio.run(inline.prepare(**_fields(step, inputs, outputs)).result())
        assert _without_timestamp(signed) == _without_timestamp(expected)
        assert fingerprint == expected_fingerprint == signer.compute.encode()
        assert wire == signed.to_json()
        assert signed.receipt.output_commitment == fingerprints.commit_tensor(outputs)
        assert eip712.recover_receipt_signer(schema.SignedReceipt.from_json(wire), DOMAIN) == signer.address


def test_an_error_in_the_child_reaches_the_caller_and_the_child_keeps_signing(signer):
    x = torch.randn(1, 1, 16)

    async def body(worker):
        bad = worker.prepare(**_fields(0, x, x, client="0xnot-an-address")).start()
        good = worker.prepare(**_fields(1, x, x)).start()
        with pytest.raises(ValueError, match="client"):
            await bad.result()
        signed, _, _ = await good.result()
        return signed, worker.failed

    signed, failed = asyncio.run(_with_worker(signer, body))
    assert failed is None and signed.receipt.step == 1


def test_a_turns_jobs_go_over_together_and_come_back_in_few_messages_each_to_its_own_step(signer, monkeypatch):
    """A round's sessions hand their receipts over in one turn of the loop: one write, and the child answers the jobs
    waiting together (at most 16 a message). Every answer still reaches its own step, a bad job's error its own."""
    from nectar.node import signing

    messages = []
    read_frame = signing._read_frame

    async def counted(reader):
        frame = await read_frame(reader)
        messages.append(len(pickle.loads(frame)))
        return frame

    monkeypatch.setattr(signing, "_read_frame", counted)
    x = torch.randn(1, 1, 16)

    async def body(worker):
        await worker.prepare(**_fields(0, x, x)).result()  # the child is up and idle
        messages.clear()
        bad = 17
        pending = [
            worker.prepare(**_fields(step, x, x, **({"client": "0xnot-an-address"} if step == bad else {}))).start()
            for step in range(1, 41)
        ]
        results = []
        for step, p in enumerate(pending, start=1):
            if step == bad:
                with pytest.raises(ValueError, match="client"):
                    await p.result()
            else:
                results.append((step, (await p.result())[0].receipt.step))
        return results, worker.failed

    results, failed = asyncio.run(_with_worker(signer, body))
    assert failed is None and all(step == signed for step, signed in results) and len(results) == 39
    assert sum(messages) == 40 and len(messages) < 40 and max(messages) <= signing.MAX_JOBS_AT_ONCE


def test_once_the_child_dies_receipts_are_signed_on_the_loop(signer, caplog):
    x = torch.randn(1, 2, 16)

    async def body(worker):
        first, _, _ = await worker.prepare(**_fields(0, x, x)).result()
        worker._process.kill()
        in_flight = worker.prepare(**_fields(1, x, x)).start()  # may be sent before the loop sees the child's end
        for _ in range(200):
            if worker.failed is not None:
                break
            await asyncio.sleep(0.01)
        later = worker.prepare(**_fields(2, x, x))
        return first, await in_flight.result(), await later.result(), later.signed_here, worker.failed

    with caplog.at_level(logging.WARNING, logger="nectar.node.signing"):
        first, (second, _, _), (third, _, _), signed_here, failed = asyncio.run(_with_worker(signer, body))
    assert failed is not None and "stopped (exit code -9" in failed and signed_here  # reaped, not left a zombie
    assert "signed on the node's event loop" in caplog.text
    assert [r.receipt.step for r in (first, second, third)] == [0, 1, 2]
    for signed in (first, second, third):
        assert eip712.recover_receipt_signer(signed, DOMAIN) == signer.address


def test_the_key_never_appears_on_the_childs_command_line(signer):
    async def body(worker):
        with open(f"/proc/{worker._process.pid}/cmdline", "rb") as f:
            return f.read()

    cmdline = asyncio.run(_with_worker(signer, body))
    assert b"nectar.node.signing" in cmdline
    assert signer.private_key.removeprefix("0x").encode() not in cmdline.replace(b"\0", b" ")


def test_closing_stops_the_child(signer):
    async def body(worker):
        return worker._process

    process = asyncio.run(_with_worker(signer, body))
    assert process.poll() is not None
    assert not os.path.exists(f"/proc/{process.pid}/cmdline") or process.returncode is not None
