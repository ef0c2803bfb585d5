"""A LoRA adapter the swarm's nodes serve is a model of the API (``<base>:<adapter>``): listed, and its greedy
completions equal PEFT's own adapted model's."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.api.conftest import ADAPTER, new_customer

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapted(market):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(market.checkpoint, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, str(market.home / ADAPTER)).eval()


def _greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def test_the_adapter_is_a_model(api, market):
    customer = new_customer(api)
    cards = {m.id: m for m in customer.openai().models.list().data}
    name = f"{market.model}:{ADAPTER}"
    assert name in cards and cards[name].root == market.model
    assert customer.openai().models.retrieve(name).id == name


def test_adapter_completions_equal_peft(api, market, tokenizer, adapted):
    customer = new_customer(api, credits="1")
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    expected = _greedy(adapted, ids, 10)
    with adapted.disable_adapter():
        assert _greedy(adapted, ids, 10) != expected  # the adapter changes the answer
    result = customer.openai().completions.create(
        model=f"{market.model}:{ADAPTER}", prompt=prompt, max_tokens=10, temperature=0
    )
    assert result.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert result.model == f"{market.model}:{ADAPTER}"
    assert result.usage.completion_tokens == len(expected)


def test_unknown_adapters_and_paths_are_no_models(api, market):
    client = new_customer(api, credits="1").openai()
    for name in (f"{market.model}:nope", f"{market.model}:../{ADAPTER}", f"{market.model}:/etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
