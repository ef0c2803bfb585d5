"""Pre-quantized checkpoints (issue 25, point 5): blocks saved nf4 / int8 by transformers + bitsandbytes load as their
stored codes, equal to the same float weights quantized at load; a mismatched --quant and tampered tensors are clear
errors. A node serving one is in tests/swarm/test_prequant_swarm.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nectar.models import load_span
from nectar.models.errors import CheckpointError
from nectar.models.prequant import checkpoint_quantization
from nectar.models.tiny import save_prequantized_checkpoint, save_tiny_checkpoint

BLOCKS, HIDDEN = 2, 64
LAYER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def float_path(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("prequant") / "float", num_layers=BLOCKS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def stored(float_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    return {mode: save_prequantized_checkpoint(root / mode, float_path, mode) for mode in ("nf4", "int8")}


def _inputs() -> torch.Tensor:
    return torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_stored_codes_equal_codes_quantized_at_load(stored, float_path, mode):
    span = load_span(stored[mode], 0, BLOCKS, quantization=mode)
    reference = load_span(float_path, 0, BLOCKS, quantization=mode)
    assert span.quantization == mode
    with torch.no_grad():
        assert torch.equal(span(_inputs()), reference(_inputs()))
    cache, reference_cache = span.new_cache(2, 8), reference.new_cache(2, 8)
    with torch.no_grad():
        for step in (_inputs()[:, :5], _inputs()[:, 5:]):
            assert torch.equal(span(step, cache=cache), reference(step, cache=reference_cache))
    # and they are the quantized weights, not float ones
    with torch.no_grad():
        assert not torch.equal(span(_inputs()), load_span(float_path, 0, BLOCKS)(_inputs()))


def test_float16_span_of_stored_nf4_codes(stored, float_path):
    """A checkpoint quantized from float32 serves a float16 span: the codes dequantize in float16."""
    span = load_span(stored["nf4"], 0, BLOCKS, dtype=torch.float16, quantization="nf4")
    reference = load_span(stored["nf4"], 0, BLOCKS, quantization="nf4")
    with torch.no_grad():
        output, expected = span(_inputs()), reference(_inputs())
    assert output.dtype == torch.float16
    assert torch.allclose(output.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("asked", ["none", "int8"])
def test_another_mode_than_the_stored_one_is_an_error(stored, asked):
    with pytest.raises(CheckpointError, match="holds nf4 weights .*--quant nf4"):
        load_span(stored["nf4"], 0, BLOCKS, quantization=asked)


def _tampered(source, tmp_path, change) -> str:
    """A copy of the pre-quantized checkpoint with ``change(tensors, config)`` applied."""
    target = tmp_path / "tampered"
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    config = json.loads((target / "config.json").read_text())
    change(tensors, config)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _set_state(tensors, **fields):
    key = f"{LAYER}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key].tolist())) | fields
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


TAMPERINGS = {
    "packed codes of another shape": (lambda t, c: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"][:-2]}), "implies"),
    "absmax of another length": (
        lambda t, c: t.update({f"{LAYER}.weight.absmax": torch.zeros(3, dtype=torch.uint8)}),
        "implies",
    ),
    "float absmax with double quantization": (
        lambda t, c: t.update({f"{LAYER}.weight.absmax": t[f"{LAYER}.weight.absmax"].float()}),
        "implies",
    ),
    "a changed NF4 code book": (lambda t, c: t[f"{LAYER}.weight.quant_map"].mul_(2), "code book"),
    "a changed nested map": (lambda t, c: t[f"{LAYER}.weight.nested_quant_map"].mul_(2), "dynamic map"),
    "non-finite nested absmax": (lambda t, c: t[f"{LAYER}.weight.nested_absmax"].fill_(float("nan")), "non-finite"),
    "a quant state of another shape": (lambda t, c: _set_state(t, shape=[64, 64]), "not nf4 of shape"),
    "a quant state of fp4": (lambda t, c: _set_state(t, quant_type="fp4"), "not nf4 of shape"),
    "an odd blocksize": (lambda t, c: _set_state(t, blocksize=48), "not nf4 of shape"),
    "a float blocksize": (lambda t, c: _set_state(t, blocksize=64.0), "not nf4 of shape"),
    "a float nested blocksize": (lambda t, c: _set_state(t, nested_blocksize=256.0), "double quantization"),
    "a dtype that is not a float": (lambda t, c: _set_state(t, dtype="int64"), "not nf4 of shape"),
    "extra quant state fields": (lambda t, c: _set_state(t, evil=1), "not nf4 of shape"),
    "a non-finite offset": (lambda t, c: _set_state(t, nested_offset="inf"), "double quantization"),
    "an oversized quant state": (
        lambda t, c: t.update(
            {f"{LAYER}.weight.quant_state.bitsandbytes__nf4": torch.full((5000,), 32, dtype=torch.uint8)}
        ),
        "at most",
    ),
    "a missing absmax": (lambda t, c: t.pop(f"{LAYER}.weight.absmax"), "lacks"),
    "a missing nested map": (lambda t, c: t.pop(f"{LAYER}.weight.nested_quant_map"), "lacks"),
    "fp4 in the config": (lambda t, c: c["quantization_config"].update(bnb_4bit_quant_type="fp4"), "nf4 only"),
    "another quantization method": (lambda t, c: c["quantization_config"].update(quant_method="gptq"), "'gptq'"),
}


@pytest.mark.parametrize("what", list(TAMPERINGS))
def test_tampered_nf4_tensors_are_clear_errors(stored, tmp_path, what):
    change, message = TAMPERINGS[what]
    path = _tampered(stored["nf4"], tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_span(path, 0, BLOCKS, quantization="nf4")


def test_tampered_int8_tensors_are_clear_errors(stored, tmp_path):
    path = _tampered(stored["int8"], tmp_path, lambda t, c: t.update({f"{LAYER}.SCB": t[f"{LAYER}.SCB"][:-1]}))
    with pytest.raises(CheckpointError, match="SCB is torch.float32"):
        load_span(path, 0, BLOCKS, quantization="int8")


def test_a_layer_kept_in_float_is_quantized_at_load(stored, float_path, tmp_path):
    """Checkpoints may keep some layers in float (transformers' skip modules): those quantize as at load."""
    floats = load_file(str(float_path / "model.safetensors"))

    def keep_float(tensors, config):
        for suffix in ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"):
            tensors.pop(f"{LAYER}.{suffix}")
        tensors.pop(f"{LAYER}.weight.quant_state.bitsandbytes__nf4")
        tensors[f"{LAYER}.weight"] = floats[f"{LAYER}.weight"]

    span = load_span(_tampered(stored["nf4"], tmp_path, keep_float), 0, BLOCKS, quantization="nf4")
    with torch.no_grad():
        assert torch.equal(span(_inputs()), load_span(float_path, 0, BLOCKS, quantization="nf4")(_inputs()))


def test_a_verifier_recomputes_a_prequantized_nodes_step_exactly(stored):
    """Receipts commit to nf4 and the model id; a local verifier hosting that model loads the same stored codes."""
    from types import SimpleNamespace

    from nectar.ledger.spot_check import LocalVerifier
    from nectar.wire.fingerprints import ComputeSpec
    from nectar.wire.receipts import model_id_hash

    node = load_span(stored["nf4"], 0, BLOCKS, quantization="nf4")
    history = _inputs()
    cache = node.new_cache(2, history.shape[1])
    with torch.no_grad():
        node(history[:, :4], cache=cache)
        served = node(history[:, 4:], cache=cache)  # the audited step: 2 tokens per sequence
    receipt = SimpleNamespace(model_id=model_id_hash("m"), block_start=0, block_end=BLOCKS, tokens=4)
    verifier = LocalVerifier({"m": stored["nf4"]})
    recomputed = verifier.execute(receipt, history, ComputeSpec("float32", "nf4"))
    assert torch.allclose(recomputed, served, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="--quant nf4"):  # a receipt claiming float weights is not recomputed
        verifier.execute(receipt, history, ComputeSpec("float32", "none"))


def test_clients_of_a_prequantized_model_route_to_its_mode_only(stored):
    """No honest node serves nf4-stored weights in another mode, so a client routes only to nodes announcing nf4."""
    from nectar.client import ClientConfig
    from nectar.client.model import stored_weights_only
    from nectar.models.resolve import load_config

    stored_mode = checkpoint_quantization(load_config(stored["nf4"]))
    assert stored_weights_only(ClientConfig(), stored_mode, "m").quant == "nf4"
    assert stored_weights_only(ClientConfig(quant="none,nf4"), stored_mode, "m").quant == "nf4"
    assert stored_weights_only(ClientConfig(quant="none"), None, "m").quant == "none"  # float checkpoints: unchanged
    with pytest.raises(ValueError, match="stores nf4 weights .* allow nf4"):
        stored_weights_only(ClientConfig(quant="none,int8"), stored_mode, "m")
