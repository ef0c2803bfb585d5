"""LoRA adapters on spans against PEFT + transformers' own adapted model, and the checks on adapter folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nectar.models import load_client_head, load_span
from nectar.models.adapters import AdapterError, check_adapter_name, load_span_adapters
from nectar.models.tiny import save_tiny_checkpoint, save_tiny_lora

peft = pytest.importorskip("peft")  # a test dependency (pyproject's test extra)

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_checkpoint(root / "tiny-llama", "llama", num_layers=4)
    adapter = save_tiny_lora(root / "style-a", base, seed=1)
    other = save_tiny_lora(root / "style-b", base, seed=2, target_modules=("k_proj", "gate_proj", "up_proj"))
    return root, base, adapter, other


def _peft_hidden(base, adapter, ids, *, name="default"):
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def _close(actual, expected, atol=ATOL):
    # float32 rounding, relative to the activations' scale (a random LoRA makes them large)
    difference = (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    assert difference <= atol, f"max abs difference {difference} > {atol}"


@pytest.mark.parametrize("splits", [[(0, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_adapted_spans_match_peft(llama, splits):
    root, base, adapter, other = llama
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    spans = [load_span(base, start, end) for start, end in splits]
    served = load_span_adapters(spans, [adapter, other], base_names={base.name})
    assert served.names == ["style-a", "style-b"]
    head = load_client_head(base)
    plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        base_states = plain(ids, output_hidden_states=True).hidden_states
    for name, folder in (("style-a", adapter), ("style-b", other)):
        states = _peft_hidden(base, folder, ids)
        for span in spans:
            with served.use(name):
                output = span(states[span.start])
            # the last hidden state transformers reports is after the final norm, which the client applies
            finish = head.norm if span.end == 4 else (lambda x: x)
            _close(finish(output), states[span.end])
            assert (finish(output) - base_states[span.end]).abs().max() > 1e-2  # the adapter matters
            # no adapter named: the base model, exactly as before
            _close(finish(span(base_states[span.start])), base_states[span.end])


def test_cached_decode_with_adapter_matches_full_pass(llama):
    root, base, adapter, _ = llama
    span = load_span(base, 0, 4)
    served = load_span_adapters([span], [adapter])
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3))
    with served.use("style-a"):
        full = span(hidden)
        cache = span.new_cache(1, 8)
        steps = torch.cat([span(hidden[:, :4], cache=cache), span(hidden[:, 4:5], cache=cache)], dim=1)
        steps = torch.cat([steps, span(hidden[:, 5:], cache=cache)], dim=1)
    _close(steps, full)


def test_gradients_flow_through_the_adapter(llama):
    root, base, adapter, _ = llama
    span = load_span(base, 1, 3)
    served = load_span_adapters([span], [adapter])
    hidden = torch.randn(1, 5, 64, requires_grad=True)
    with served.use("style-a"):
        (grad_adapted,) = torch.autograd.grad(span(hidden).sum(), hidden)
    (grad_base,) = torch.autograd.grad(span(hidden).sum(), hidden)
    assert (grad_adapted - grad_base).abs().max() > 1e-3


def test_names_are_tokens_never_paths():
    assert check_adapter_name("style-a.v2") == "style-a.v2"
    for bad in ["../etc", "/tmp/x", "a/b", "a\\b", "", ".hidden", "x" * 65, None, 3]:
        with pytest.raises(AdapterError):
            check_adapter_name(bad)


def test_adapters_that_do_not_fit_are_refused(llama, tmp_path):
    root, base, adapter, _ = llama
    span = load_span(base, 0, 2)
    wider = save_tiny_checkpoint(tmp_path / "wider", "llama", num_layers=4, hidden_size=32)
    foreign = save_tiny_lora(tmp_path / "foreign", wider)
    with pytest.raises(AdapterError, match="trained on"):
        load_span_adapters([span], [foreign], base_names={base.name})
    with pytest.raises(AdapterError, match="do not fit"):
        load_span_adapters([span], [foreign])  # no name to compare: the shapes still tell
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        load_span_adapters([span], [tmp_path])
    with pytest.raises(AdapterError, match="at most"):
        load_span_adapters([span], [adapter] * 3, max_adapters=2)
    with pytest.raises(AdapterError, match="two adapters are named"):
        load_span_adapters([span], [adapter, adapter])

    # a DoRA (or any non-plain LoRA) is refused, not served as a LoRA
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="use_dora"):
        load_span_adapters([span], [dora])

    # weights of something other than a block's Linear layers (here the LM head) are refused
    head = tmp_path / "head"
    head.mkdir()
    (head / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(head / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lm_head"):
        load_span_adapters([span], [head])


def test_bloom_blocks_take_adapters_too(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "tiny-bloom", "bloom", num_layers=4)
    adapter = save_tiny_lora(tmp_path / "bloom-a", base, seed=1, target_modules=("query_key_value", "dense_4h_to_h"))
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    states = _peft_hidden(base, adapter, ids)
    spans = [load_span(base, 0, 2), load_span(base, 2, 3)]
    served = load_span_adapters(spans, [adapter], base_names={base.name})
    for span in spans:
        with served.use("bloom-a"):
            _close(span(states[span.start]), states[span.end])
        assert (span(states[span.start]) - states[span.end]).abs().max() > 1e-2
