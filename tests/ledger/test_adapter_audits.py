"""Spot checks of steps computed with a LoRA adapter (issue 23): the receipt's descriptor binds the adapter's
digest, verifiers holding that adapter recompute with it (an honest node passes, one that skips the adapter fails),
and verifiers without it end inconclusive rather than judge against the base model."""

from __future__ import annotations

import os
import re

import pytest
import torch

from nectar.ledger.adapter_store import AdapterRejected, AdapterStore
from nectar.ledger.core.config import Settings
from nectar.ledger.migrations import run_migrations
from nectar.ledger.spot_check import AuditedStep, AuditFailed, AuditSource, LocalVerifier, SpotChecker
from nectar.models import load_span
from nectar.models.adapters import adapter_digest, load_span_adapters, read_adapter_files
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


# ---- issue 21: no free evasion through an adapter the ledger does not hold -----------------------------------------


class NodeHandsOver(KeptSteps):
    """An audit source that asks the node for the adapter it computed with, as ``RpcAuditSource.adapter`` does
    minus the network: the node's side reads its adapter folder (``read_adapter_files``, what ``rpc_adapter`` sends),
    the ledger's side checks and keeps the files (``AdapterStore.admit``). ``answer``: what the node does."""

    def __init__(self, node_folders: dict[bytes, os.PathLike], store: AdapterStore, answer: str = "honest"):
        super().__init__()
        self.node_folders, self.store, self.answer, self.asked = node_folders, store, answer, 0

    def adapter(self, receipt, digest):
        self.asked += 1
        if self.answer == "refuse" or digest not in self.node_folders:
            raise AuditFailed(f"node {receipt.node} answered unknown_adapter: no adapter 0x{digest.hex()[:16]}")
        config, weights = read_adapter_files(self.node_folders[digest])
        if self.answer == "other files":  # another adapter's weights: cheaper to serve, or never the one it used
            weights = weights[:-1] + bytes([weights[-1] ^ 1])
        try:
            return self.store.admit(digest, config, weights)
        except AdapterRejected as e:
            raise AuditFailed(f"node {receipt.node} answered the adapter call with {e}") from e


@pytest.fixture
def own_adapter(world, tmp_path):
    """An adapter of the node's own making (no ledger holds it), the verifiers without any, the ledger's store."""
    folder = save_tiny_lora(tmp_path / "node" / "style-a", world["path"], seed=11)
    digest = adapter_digest(folder)
    span = load_span(world["path"], 0, 2)
    served = load_span_adapters([span], [folder])
    verifiers = [LocalVerifier({MODEL: world["path"]}, name=n) for n in ("a", "b")]
    store = AdapterStore(tmp_path / "ledger-adapters")
    descriptor = fingerprints.ComputeSpec("float32", adapter=digest).encode()
    return dict(
        folder=folder, digest=digest, span=span, served=served, verifiers=verifiers, store=store, descriptor=descriptor
    )


def test_a_node_serving_garbage_with_its_own_adapter_is_convicted(world, own_adapter):
    """The attack: outputs corrupted under an adapter no verifier held used to end inconclusive, never audited. Now
    the ledger fetches the adapter from the node by digest and recomputes: the corruption is convicted."""
    o = own_adapter
    source = NodeHandsOver({o["digest"]: o["folder"]}, o["store"])
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=o["verifiers"], audit=source)
    kwargs = dict(descriptor=o["descriptor"], span=o["span"], served=o["served"])
    cheat = _step(world, source, with_adapter=True, noise=0.5, **kwargs)
    verdict = checker._judge(cheat, o["descriptor"])
    assert (verdict.status, verdict.executions) == ("failed", 3), verdict.detail
    # the fetched files are the node's, checked against the receipt's digest, kept in the ledger's folder
    assert adapter_digest(o["store"].get(o["digest"])) == o["digest"]
    assert all(v.holds_adapter(o["digest"]) for v in o["verifiers"])

    # an honest step with the same adapter passes, without asking the node again
    honest = _step(world, source, with_adapter=True, **kwargs)
    verdict = checker._judge(honest, o["descriptor"])
    assert verdict.status == "passed", verdict.detail
    assert source.asked == 1


@pytest.mark.parametrize("answer", ["refuse", "other files"])
def test_a_node_that_keeps_its_adapter_from_the_ledger_fails_the_audit(world, own_adapter, answer):
    """Refusing the adapter, or handing over files of another digest, is evading the audit: it costs what failing
    it costs, even for a step computed honestly."""
    o = own_adapter
    source = NodeHandsOver({o["digest"]: o["folder"]}, o["store"], answer=answer)
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=o["verifiers"], audit=source)
    honest = _step(world, source, with_adapter=True, descriptor=o["descriptor"], span=o["span"], served=o["served"])
    verdict = checker._judge(honest, o["descriptor"])
    assert (verdict.status, verdict.executions) == ("failed", 0), verdict.detail
    assert "adapter" in verdict.detail and o["store"].get(o["digest"]) is None
    assert not any(v.holds_adapter(o["digest"]) for v in o["verifiers"])


def test_the_ledgers_adapter_store_is_bounded(world, own_adapter, tmp_path):
    """Files over the cap are refused (a node cannot fill the ledger's disk), and the store keeps a bounded number
    of adapters, the least recently used deleted first (a verifier that held one fetches it again)."""
    o = own_adapter
    config, weights = read_adapter_files(o["folder"])
    small = AdapterStore(tmp_path / "small", max_bytes=len(config) + len(weights) - 1)
    with pytest.raises(AdapterRejected, match="at most"):
        small.admit(o["digest"], config, weights)
    assert not list(tmp_path.glob("small/*"))  # nothing written

    two = AdapterStore(tmp_path / "two", max_adapters=2)
    folders = [save_tiny_lora(tmp_path / "more" / f"s{seed}", world["path"], seed=seed) for seed in (21, 22, 23)]
    kept = [two.admit(adapter_digest(f), *read_adapter_files(f)) for f in folders]
    assert not kept[0].exists() and kept[1].is_dir() and kept[2].is_dir()
    assert two.get(adapter_digest(folders[0])) is None

    verifier = LocalVerifier({MODEL: world["path"]})
    verifier.add_adapter(adapter_digest(folders[0]), kept[0])
    assert not verifier.holds_adapter(adapter_digest(folders[0]))  # evicted: asked for again, never run half-gone


def test_a_node_binding_an_adapter_no_one_can_compute_with_fails(world, own_adapter, tmp_path):
    """A node cannot dodge the recomputation with files that hash to its receipts' digest but are no LoRA at all
    (an honest node refuses to load them): the verifier's failure to load them is the node's failure."""
    o = own_adapter
    junk = tmp_path / "node" / "junk"
    junk.mkdir(parents=True)
    (junk / "adapter_config.json").write_bytes((o["folder"] / "adapter_config.json").read_bytes())
    (junk / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    digest = adapter_digest(junk)
    descriptor = fingerprints.ComputeSpec("float32", adapter=digest).encode()
    source = NodeHandsOver({digest: junk}, o["store"])
    checker = SpotChecker(settings=world["settings"], engine=world["engine"], verifiers=o["verifiers"], audit=source)
    garbage = _step(world, source, with_adapter=False, descriptor=descriptor, noise=0.5)
    verdict = checker._judge(garbage, descriptor)
    assert verdict.status == "failed" and "cannot be computed with" in verdict.detail, verdict.detail
