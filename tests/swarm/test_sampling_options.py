"""The client's OpenAI sampling options on a real swarm of a tiny Llama with SmolLM2's tokenizer: logprobs and
prompt logprobs equal transformers' log-softmax, logit bias forces and bans tokens, presence/frequency penalties
stop repetition, a JSON schema constrains sampled output, and greedy output without options is unchanged."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from nectar.client import ClientConfig, DistributedModelForCausalLM
from nectar.node.local_swarm import LocalSwarm
from tests.api.utils import make_chat_checkpoint

pytestmark = pytest.mark.slow
NODE_ARGS = ["--throughput", "100", "--announce-period", "2"]
EOS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(make_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-chat"))


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.add_node(checkpoint, blocks=(0, 4), name="a", extra_args=NODE_ARGS)
        swarm.wait_for_blocks(checkpoint, 4)
        yield swarm


@pytest.fixture(scope="module")
def model(swarm, checkpoint):
    model = DistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, config=ClientConfig(max_retries=0, step_timeout=20)
    )
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from nectar.models import load_tokenizer

    return load_tokenizer(checkpoint)


def prompt_ids(tokenizer, text="The quick brown fox jumps over") -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_logprobs_and_prompt_logprobs_equal_local_log_softmax(model, reference, tokenizer):
    ids = prompt_ids(tokenizer)
    steps = list(
        model.stream_generate_steps(
            ids, max_new_tokens=5, do_sample=False, logprobs=3, prompt_logprobs=2, eos_token_id=EOS, tokenizer=tokenizer
        )
    )
    prompt, generated = steps[0].logprobs, steps[1:]
    tokens = torch.stack([s.tokens for s in generated], dim=1)
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=EOS)
    assert torch.equal(tokens[0, : greedy.shape[1] - ids.shape[1]], greedy[0, ids.shape[1] :])  # same greedy tokens
    with torch.no_grad():
        full = torch.cat([ids, tokens], dim=1)
        local = torch.log_softmax(reference(full).logits.float(), dim=-1)[0]
    n = ids.shape[1]
    expected_prompt = local[: n - 1].gather(1, ids[0, 1:, None])[:, 0]
    assert prompt.logprobs.shape == (1, n - 1) and prompt.top_ids.shape == (1, n - 1, 2)
    torch.testing.assert_close(prompt.logprobs[0], expected_prompt, atol=1e-4, rtol=0)
    torch.testing.assert_close(prompt.top_logprobs[0], local[: n - 1].topk(2).values, atol=1e-4, rtol=0)
    for t, step in enumerate(generated):
        row = local[n - 1 + t]
        assert step.logprobs.top_ids.shape == (1, 1, 3)
        assert int(step.logprobs.top_ids[0, 0, 0]) == int(step.tokens[0]) == int(row.argmax())  # greedy = top 1
        torch.testing.assert_close(step.logprobs.logprobs[0, 0], row[step.tokens[0]], atol=1e-4, rtol=0)


def test_prompt_logprobs_without_new_tokens(model, tokenizer):
    ids = prompt_ids(tokenizer)
    [only] = list(model.stream_generate_steps(ids, max_new_tokens=0, prompt_logprobs=0))
    assert only.logprobs.logprobs.shape == (1, ids.shape[1] - 1) and only.logprobs.top_ids.shape[-1] == 0
    assert list(model.stream_generate_steps(ids, max_new_tokens=0)) == []


def test_logit_bias_forces_and_bans(model, tokenizer):
    ids = prompt_ids(tokenizer)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    forced = model.generate(ids, max_new_tokens=6, do_sample=True, seed=1, logit_bias={42: 100.0})
    assert forced[0, ids.shape[1] :].tolist() == [42] * 6
    banned = model.generate(ids, max_new_tokens=6, do_sample=False, logit_bias={greedy[0]: -100.0})
    assert greedy[0] not in banned[0, ids.shape[1] :].tolist()


def test_presence_and_frequency_penalties_follow_openai(model, reference, tokenizer):
    ids = prompt_ids(tokenizer)
    bias = {42: 8.0}  # makes token 42 the favourite, so unpenalised greedy repeats it
    options = dict(max_new_tokens=8, do_sample=False, logit_bias=bias)
    repeated = model.generate(ids, **options)[0, ids.shape[1] :].tolist()
    penalised = model.generate(ids, presence_penalty=1.5, frequency_penalty=0.75, **options)[0, ids.shape[1] :]
    assert repeated.count(42) > penalised.tolist().count(42)
    with torch.no_grad():  # every step is the argmax of raw logits + bias - OpenAI's penalties over earlier tokens
        logits = reference(torch.cat([ids, penalised[None]], dim=1)).logits[0, ids.shape[1] - 1 : -1].float()
    for t, token in enumerate(penalised.tolist()):
        scores = logits[t].clone()
        scores[42] += 8.0
        counts = torch.bincount(penalised[:t], minlength=scores.shape[0]).float()
        scores -= counts * 0.75 + (counts > 0).float() * 1.5
        assert token == int(scores.argmax()), t


def test_json_schema_constrains_sampled_rows(model, tokenizer):
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["colour", "count", "ok"],
        "additionalProperties": False,
    }
    ids = prompt_ids(tokenizer).expand(3, -1)
    for seed in range(3):
        out = model.generate(
            ids, max_new_tokens=40, do_sample=True, seed=seed, json_schema=schema, tokenizer=tokenizer, eos_token_id=EOS
        )
        for row in out[:, ids.shape[1] :].tolist():
            assert EOS in row, tokenizer.decode(row)
            text = tokenizer.decode(row[: row.index(EOS)])
            jsonschema.validate(json.loads(text), schema)
