"""Quantized weights on nodes (issue 23, item 3): ``load_span(..., quantization=)`` through bitsandbytes, the node's
announcement and receipts carrying the mode, batched rounds through the quantized layers (equality with the generic
path: tests/speed/test_quant_batching.py). The spot checks that re-execute in the
receipt's mode are in tests/ledger/test_quant_audits.py."""

from __future__ import annotations

import os
import time
import zlib

import pytest
import torch
from torch import nn

from nectar.client.payments import _compute_problems
from nectar.deployment import domain_from_deployment
from nectar.models import load_span
from nectar.models.families.llama.batching import LlamaBatchRunner
from nectar.models.quant import QUANT_MODES, Int8WeightLinear, module_bytes
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.backend import SpanBackend
from nectar.node.receipts import ReceiptSigner
from nectar.wire.announce import ServerInfo
from nectar.wire.fingerprints import QUANTIZATIONS, ComputeSpec, fingerprint_hash
from nectar.wire.receipts import ReceiptKind
from tests.ledger.utils import Party

BLOCKS, HIDDEN = 4, 64
# bounds on |quantized - float32| / |float32| over 4 random blocks (measured: int8 ~1.1%, nf4 ~17%): generous, but
# a wrong scale (x127), unquantized weights or garbage codes land far outside them
BOUNDS = {"int8": (1e-3, 0.04), "nf4": (0.03, 0.35)}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("quant") / "tiny", "llama", num_layers=BLOCKS, hidden_size=HIDDEN
    )


def _inputs(n: int = 7) -> torch.Tensor:
    return torch.randn(2, n, HIDDEN, generator=torch.Generator().manual_seed(zlib.crc32(b"quant")))


def test_every_mode_has_a_receipt_code():
    assert set(QUANT_MODES) == set(QUANTIZATIONS.values())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_span_is_close_to_full_precision_and_smaller(path, mode, dtype):
    full = load_span(path, 0, BLOCKS)
    span = load_span(path, 0, BLOCKS, dtype=dtype, quantization=mode)
    assert span.quantization == mode and mode in repr(span)
    assert not any(type(m) is nn.Linear for m in span.modules()), "every linear layer is quantized"
    x = _inputs()
    with torch.no_grad():
        reference, output = full(x), span(x)
    assert output.dtype == dtype
    error = float((output.float() - reference).norm() / reference.norm())
    low, high = BOUNDS[mode]
    assert low < error < high, error  # the weights really are quantized, and close

    # KV-cached steps give the full pass's outputs (what a verifier's recomputation relies on)
    cache = span.new_cache(2, x.shape[1])
    with torch.inference_mode():
        steps = torch.cat([span(x[:, :4], cache=cache), span(x[:, 4:5], cache=cache), span(x[:, 5:], cache=cache)], 1)
    assert torch.allclose(steps.float(), output.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 0.05)

    # memory per block: float32 linear weights are 4 bytes a weight, int8 1 (+ scales), nf4 half a byte (+ scales and
    # each layer's fixed quantization state: code maps and a JSON header, about 1.3 KB, a fifth of a 64-wide layer)
    ratio = module_bytes(span.blocks[0]) / module_bytes(full.blocks[0])
    assert ratio < {"int8": 0.3, "nf4": 0.22}[mode], ratio
    if mode == "nf4":  # the weights themselves: two codes a byte
        quantized = [m for m in span.blocks[0].modules() if getattr(getattr(m, "weight", None), "quant_state", None)]
        codes = sum(m.weight.numel() for m in quantized)
        weights = sum(m.weight.numel() for m in full.blocks[0].modules() if type(m) is nn.Linear)
        assert codes * 2 == weights


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantization_is_reproducible(path, mode):
    """Two loads (a node's and its verifier's) hold the same codes and compute the same outputs, bit for bit."""
    a, b = (load_span(path, 1, 3, quantization=mode) for _ in range(2))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name


def test_int8_layer_is_bitsandbytes_weight_only_product():
    """The int8 layer computes bitsandbytes' own weight-only product (MatMul8bitFp), whatever the module's casts."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=True)
    layer = Int8WeightLinear.from_linear(linear)
    assert layer.CB.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    x = torch.randn(3, 48)
    state = bnb.MatmulLtState()
    state.CB, state.SCB, state.has_fp16_weights = layer.CB, layer.SCB, False
    expected = bnb.autograd._functions.MatMul8bitFp.apply(x, layer.CB, None, linear.bias.detach(), state)
    assert torch.equal(layer(x), expected)
    layer.to(torch.bfloat16)  # a cast of the module keeps the scales in float32
    assert layer.SCB.dtype == torch.float32 and layer.CB.dtype == torch.int8


def test_gradients_flow_through_quantized_spans(path):
    """Training through a node's span: gradients reach the inputs; the quantized weights stay frozen."""
    span = load_span(path, 0, 2, quantization="nf4")
    x = _inputs().requires_grad_(True)
    span(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_mode_is_refused_with_the_choices(path):
    with pytest.raises(ValueError, match="none, int8, nf4"):
        load_span(path, 0, 1, quantization="int4")


def test_node_batches_quantized_blocks_through_their_own_layers(path, caplog):
    plain = SpanBackend(path, 0, 2, dtype=torch.float32, device="cpu", show_progress=False)
    assert plain.batch_runner is not None and not plain.batch_runner.quantized
    with caplog.at_level("INFO", logger="nectar.node.backend"):
        quantized = SpanBackend(path, 0, 2, dtype=torch.float32, device="cpu", quantization="int8", show_progress=False)
    assert LlamaBatchRunner.supports(quantized.blocks) and quantized.batch_runner.quantized
    assert "batched Llama runner (int8 weights through the blocks' own quantized layers" in caplog.text
    assert all(isinstance(layer.o_proj, Int8WeightLinear) for layer in quantized.batch_runner.layers)


def test_announcement_and_receipts_carry_the_mode():
    info = ServerInfo(
        state=2, start=0, end=4, throughput=1.0, inference_rps=1.0, forward_rps=1.0, network_rps=1.0,
        dtype="float32", cache_tokens_left=10, price_per_token=1, eth_address="0x0", quant="nf4",
    )  # fmt: skip
    assert ServerInfo.from_dict(info.to_dict()).quant == "nf4"
    for hostile in ("int3", ["nf4"], 8, None):
        with pytest.raises(ValueError, match="quantization"):
            ServerInfo.from_dict(info.to_dict() | {"quant": hostile})
    legacy = info.to_dict()
    del legacy["quant"]
    assert ServerInfo.from_dict(legacy).quant == "none"  # a record without the field: full-precision weights

    party = Party()
    signer = ReceiptSigner(
        private_key=party.key,
        model_id="tiny",
        price_per_token=1,
        domain=domain_from_deployment(),
        compute=ComputeSpec.of(torch.float16, "cuda:0", "int8"),
    )
    inputs, outputs = torch.randn(1, 2, HIDDEN), torch.randn(1, 2, HIDDEN)
    signed, descriptor = signer.sign(
        session_id=os.urandom(32), step=0, kind=ReceiptKind.INFERENCE, start=0, end=BLOCKS,
        client=Party().address, tokens=2, inputs=inputs, outputs=outputs,
    )  # fmt: skip
    assert ComputeSpec.decode(descriptor) == ComputeSpec("float16", "int8", "cuda")
    assert signed.receipt.fingerprint == fingerprint_hash(descriptor)  # signed: bound into the receipt
    # the client holds the node to its announcement: int8 receipts from a node that announced nf4 are refused
    assert _compute_problems(signed.receipt, descriptor, "float16", quant="int8") == []
    assert _compute_problems(signed.receipt, descriptor, "float16", quant="nf4") == [
        "the receipt commits to int8 weights, the node announced nf4"
    ]


def test_a_client_can_require_the_weights_it_is_served():
    """``ClientConfig.quant`` keeps routes on nodes announcing an allowed quantization, and says which it left out."""
    from hivemind.p2p import PeerID

    from nectar.client.config import ClientConfig
    from nectar.client.routing import MissingBlocksError, RemoteSequenceManager

    def info(quant, throughput):
        return ServerInfo(
            state=2, start=0, end=4, throughput=throughput, inference_rps=throughput, forward_rps=throughput,
            network_rps=1e9, dtype="float16", cache_tokens_left=10**6, price_per_token=0,
            eth_address="0x" + "11" * 20, quant=quant,
        )  # fmt: skip

    full, nf4 = PeerID(b"\x00\x24\x08\x01\x12\x20" + b"\x01" * 32), PeerID(b"\x00\x24\x08\x01\x12\x20" + b"\x02" * 32)
    servers = {full: info("none", 100.0), nf4: info("nf4", 100.0)}

    def manager(quant):
        m = RemoteSequenceManager(None, "m", 4, config=ClientConfig(quant=quant))
        m._servers, m._updated = {b: dict(servers) for b in range(4)}, time.monotonic() + 3600
        m._latency = {nf4: 0.001, full: 0.5}  # the nf4 node is nearer: routes pick it unless it is ruled out
        m.update = lambda force=False: None  # a fixed view, no DHT lookups
        return m

    assert manager("").make_inference_route()[0].peer_id == nf4
    assert manager("none,int8").make_inference_route()[0].peer_id == full
    servers.pop(full)
    with pytest.raises(MissingBlocksError, match=r"serves nf4 weights \(--quant allows none,int8\)"):
        manager("none,int8").make_inference_route()


def test_nf4_layers_bitsandbytes_cannot_repack_keep_the_plain_cpu_layout(monkeypatch):
    """On AVX512-BF16 CPUs bitsandbytes repacks nf4 codes on the first forward, which fails for an input size that is
    not a multiple of 64 (a real intermediate size such as 1376): such layers must keep the layout every CPU runs."""
    import bitsandbytes.nn.modules as bnb_modules

    from nectar.models.quant import quantize_block

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as on such a CPU, whatever this one is
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(1376, 64, bias=False))
    reference = block[0].weight.detach().clone()
    quantize_block(block, "nf4", torch.float32)
    x = torch.randn(3, 1376)
    with torch.inference_mode():
        y = block(x)
    assert y.shape == (3, 64) and torch.isfinite(y).all()
    assert (y - x @ reference.t()).abs().max() < 0.35 * (x @ reference.t()).abs().max()


def test_nf4_products_through_the_scratch_fall_back_to_bitsandbytes_when_its_ops_refuse(caplog):
    """``NF4Rows`` calls bitsandbytes' dequantize ops into a shared scratch (GPU nodes); where they refuse the call
    (here: the CPU has no ``out=`` kernels, as an incompatible bitsandbytes would refuse), the layer keeps answering
    through bitsandbytes' own product, with one warning, and few-row products never touch the scratch."""
    from nectar.models.quant import FUSED_ROWS, NF4Rows, NF4Scratch, _nf4_linear

    torch.manual_seed(0)
    layer = _nf4_linear(torch.nn.Linear(256, 192, bias=False), torch.float16)
    scratch = NF4Scratch([layer], torch.float16, torch.device("cpu"))
    product = NF4Rows(layer, scratch)
    with torch.inference_mode():
        few = torch.randn(FUSED_ROWS, 256).half()
        assert torch.equal(product(few), layer(few)) and product.error is None
        many = torch.randn(9, 256).half()
        with caplog.at_level("WARNING"):
            assert torch.equal(product(many), layer(many))
            assert torch.equal(product(many), layer(many))
    assert product.error and sum("shared scratch failed" in r.message for r in caplog.records) == 1
