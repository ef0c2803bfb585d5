"""Choice text with the real SmolLM2 tokenizer: what is streamed always adds up to the final text, stop strings cut
(even across tokens) and are never emitted, half characters are held back, eos ends a choice."""

from __future__ import annotations

import pytest

from nectar.api.text import ChoiceText


@pytest.fixture(scope="module")
def tokenizer():
    from nectar.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def run(tokenizer, text: str, **kwargs) -> tuple[list[str], ChoiceText]:
    choice = ChoiceText(tokenizer, **kwargs)
    deltas = [choice.add(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    deltas.append(choice.finish())
    return deltas, choice


def test_deltas_add_up_to_the_text(tokenizer):
    deltas, choice = run(tokenizer, "Hello world, this is fine.")
    assert "".join(deltas) == "Hello world, this is fine." == choice.text
    assert choice.finish_reason == "length" and choice.num_tokens == len(
        tokenizer("Hello world, this is fine.")["input_ids"]
    )


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tokenizer):
    deltas, choice = run(tokenizer, "one two THE END three four", stops=["THE END"])
    assert "".join(deltas) == "one two " == choice.text
    assert all("THE" not in d for d in deltas)
    assert choice.finish_reason == "stop"
    assert choice.add(5) == "" and choice.num_tokens == len(tokenizer("one two THE END")["input_ids"])


def test_a_partial_stop_string_is_released_when_it_does_not_complete(tokenizer):
    deltas, choice = run(tokenizer, "the ENDless story", stops=["END!"])
    assert "".join(deltas) == "the ENDless story" and choice.finish_reason == "length"


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Fondue 🧀 et crème brûlée 🍮"
    deltas, choice = run(tokenizer, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_eos_ends_the_choice_and_counts_as_a_token(tokenizer):
    choice = ChoiceText(tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    ids = tokenizer("Done", add_special_tokens=False)["input_ids"]
    text = "".join(choice.add(t) for t in ids) + choice.add(tokenizer.eos_token_id) + choice.add(ids[0])
    assert text == "Done" and choice.finish_reason == "stop" and choice.num_tokens == len(ids) + 1
