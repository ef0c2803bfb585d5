"""Spot checks of steps computed with a LoRA adapter (issue 23): the receipt's descriptor binds the adapter's
digest, verifiers holding that adapter recompute with it (an honest node passes, one that skips the adapter fails),
and verifiers without it end inconclusive rather than judge against the base model."""

from __future__ import annotations

import os
import re

import pytest
import torch

from nectar.ledger.core.config import Settings
from nectar.ledger.migrations import run_migrations
from nectar.ledger.spot_check import AuditedStep, AuditSource, LocalVerifier, SpotChecker
from nectar.models import load_span
from nectar.models.adapters import adapter_digest, load_span_adapters
from nectar.models.tiny import save_tiny_checkpoint, save_tiny_lora
from nectar.service.db import get_engine
from nectar.wire import fingerprints
from nectar.wire import receipts as R
from tests.ledger.utils import Party

pytest.importorskip("peft")
MODEL = "tiny-adapter-audit"


class KeptSteps(AuditSource):
    """What the node's audit RPC would serve: each step's full input history and its output as sent."""

    def __init__(self):
        self.steps: dict[bytes, AuditedStep] = {}

    def audited_step(self, receipt):
        return self.steps.get(receipt.session_id)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-audit")
    path = save_tiny_checkpoint(root / MODEL, "llama", num_layers=4)
    adapter = save_tiny_lora(root / "adapters" / "style-a", path, seed=4)
    settings = Settings(
        database_url=f"sqlite:///{root / 'ledger.db'}", spot_check_fraction=1.0, deployment_path=root / "none.json"
    )
    run_migrations(settings.database_url)
    span = load_span(path, 0, 2)
    served = load_span_adapters([span], [adapter])
    return dict(settings=settings, engine=get_engine(settings.database_url), path=path, span=span, served=served)


def _step(world, kept: KeptSteps, *, with_adapter: bool, descriptor: bytes, span=None, served=None, noise=0.0):
    """A node's decode step after a prefill (through its KV cache), kept for audit; its receipt."""
    node, client = Party(), Party()
    span, served = span or world["span"], served or world["served"]
    history = torch.randn(1, 6, 64)
    cache = span.new_cache(1, 8)
    with torch.no_grad(), served.use("style-a" if with_adapter else None):
        span(history[:, :5], cache=cache)
        output = span(history[:, 5:], cache=cache)
        output = output + noise * output.abs().mean() * torch.randn_like(output)  # a subtle cheat (noise > 0)
    session = os.urandom(32)
    kept.steps[session] = AuditedStep(history, output)
    return R.Receipt(
        session_id=session,
        step=1,
        kind=0,
        model_id=R.model_id_hash(MODEL),
        block_start=0,
        block_end=2,
        node=node.address,
        client=client.address,
        tokens=1,
        price=0,
        amount=0,
        input_commitment=fingerprints.commit_tensor(history[:, 5:]),
        output_commitment=fingerprints.commit_tensor(output),
        fingerprint=fingerprints.fingerprint_hash(descriptor),
        timestamp=1,
    )


def test_adapter_steps_are_recomputed_with_the_adapter(world):
    digest = world["served"].adapters["style-a"].digest
    assert digest == adapter_digest(world["served"].adapters["style-a"].path)
    descriptor = fingerprints.ComputeSpec("float32", adapter=digest).encode()
    folder = world["served"].adapters["style-a"].path
    verifiers = [LocalVerifier({MODEL: world["path"]}, name=n, adapters=[folder]) for n in ("a", "b")]
    kept = KeptSteps()
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=verifiers, audit=kept)

    honest = _step(world, kept, with_adapter=True, descriptor=descriptor)
    assert checker._judge(honest, descriptor).status == "passed"
    # a node that bills adapter work but runs the base model (cheaper: the fused batched path) is caught
    lazy = _step(world, kept, with_adapter=False, descriptor=descriptor)
    verdict = checker._judge(lazy, descriptor)
    assert verdict.status == "failed" and verdict.executions == 3

    # verifiers without the adapter never judge such a step against the base model
    blind = [LocalVerifier({MODEL: world["path"]}, name=n) for n in ("a", "b")]
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=blind, audit=kept)
    verdict = checker._judge(honest, descriptor)
    assert (verdict.status, verdict.executions) == ("inconclusive", 0) and "adapter" in verdict.detail


def test_the_pooled_test_scores_adapter_steps_against_the_adapted_model(world):
    """bfloat16 steps are scored against a float32 recomputation of the adapted model: against the base model's, both
    distances would be the adapter's effect, every score about 1, and noise under the single-step tolerance unseen."""
    folder = world["served"].adapters["style-a"].path
    descriptor = fingerprints.ComputeSpec("bfloat16", adapter=world["served"].adapters["style-a"].digest).encode()
    verifiers = [LocalVerifier({MODEL: world["path"]}, name=n, adapters=[folder]) for n in ("a", "b")]
    kept = KeptSteps()
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=verifiers, audit=kept)
    span = load_span(world["path"], 0, 2, dtype=torch.bfloat16)
    served = load_span_adapters([span], [folder])
    torch.manual_seed(0)
    scores = []
    for noise in (0.0, 0.025):  # honest, then noise that passes the single-step check
        receipt = _step(world, kept, with_adapter=True, descriptor=descriptor, span=span, served=served, noise=noise)
        verdict = checker._judge(receipt, descriptor, pooled=(1, os.urandom(32)))
        assert verdict.status == "passed", verdict.detail
        scores.append(float(re.search(r"pooled score ([0-9.e+-]+)", verdict.detail).group(1)))
    # noise under the tolerance raises a step's score a little (the CUSUM adds it up); against the base model both
    # scores would be 1.0 to 3 digits (seeded: the same numbers every run on a CPU)
    assert scores[0] < 1.1 < scores[1], scores
