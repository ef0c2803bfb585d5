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


def test_a_stop_string_is_held_while_its_next_character_is_half_decoded(tokenizer):
    """ "テ" is whole while "キ" arrives byte by byte: "テ" may begin the stop string, so it waits."""
    deltas, choice = run(tokenizer, "カタカナのテキスト", stops=["テキスト"])
    assert "".join(deltas) == "カタカナの" == choice.text and choice.finish_reason == "stop"
    assert all("テ" not in d for d in deltas)


def test_eos_ends_the_choice_and_counts_as_a_token(tokenizer):
    choice = ChoiceText(tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    ids = tokenizer("Done", add_special_tokens=False)["input_ids"]
    text = "".join(choice.add(t) for t in ids) + choice.add(tokenizer.eos_token_id) + choice.add(ids[0])
    assert text == "Done" and choice.finish_reason == "stop" and choice.num_tokens == len(ids) + 1


class FullDecodeText:
    """The reference: ChoiceText decoding every token's whole answer (as it did before incremental decoding)."""

    def __init__(self, tokenizer, stops=(), eos=()):
        from nectar.api.text import REPLACEMENT_CHAR, _held_suffix

        self.tokenizer, self.stops, self.eos = tokenizer, [s for s in stops if s], set(eos)
        self.held, self.replacement = _held_suffix, REPLACEMENT_CHAR
        self.tokens, self.text, self.emitted, self.finish_reason = [], "", 0, None

    def add(self, token: int) -> str:
        if self.finish_reason:
            return ""
        if token in self.eos:
            self.finish_reason = "stop"
            return self.flush(len(self.text))
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = text[:cut], "stop"
            return self.flush(len(self.text))
        self.text = text
        whole = len(text)
        while whole > self.emitted and text[whole - 1] == self.replacement:
            whole -= 1
        return self.flush(whole - self.held(text, self.stops, whole))

    def flush(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta


SAMPLES = [
    "Fondue 🧀 et crème brûlée 🍮, s'il vous plaît!",
    "日本語のテキストと emoji 👩‍👩‍👧 mixed with ASCII; ÄÖÜ ß.",
    "def f(x):\n    return x ** 2  # ¿qué?\n\n\tend",
    "Ελληνικά, русский, עברית, العربية — “quotes” … and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
]


def sequences(tokenizer, rng, count: int):
    """Random token sequences: uniform over the vocabulary (special tokens, fragments of multi-byte characters),
    real multilingual text cut at random token boundaries, and real text with random tokens spliced in."""
    vocab = len(tokenizer)
    for i in range(count):
        kind = i % 3
        if kind == 0:
            yield [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
            continue
        ids = tokenizer(rng.choice(SAMPLES) + rng.choice(SAMPLES), add_special_tokens=False)["input_ids"]
        if kind == 2:
            for _ in range(rng.randrange(1, 6)):
                ids.insert(rng.randrange(len(ids) + 1), rng.randrange(vocab))
        yield ids[: rng.randrange(1, len(ids) + 1)]


def test_incremental_decoding_equals_full_decoding_on_random_sequences(tokenizer):
    """Every delta, the final text and the finish reason equal those of decoding the whole answer every token, with
    and without stop strings (taken from the text itself, multi-byte ones included) and eos."""
    import random

    rng = random.Random(24)
    eos = [tokenizer.eos_token_id]
    for ids in sequences(tokenizer, rng, 600):
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stops: list[str] = []
        if full and rng.random() < 0.6:
            for _ in range(rng.randrange(1, 3)):
                start = rng.randrange(len(full))
                stops.append(full[start : start + rng.randrange(1, 6)])
        reference, choice = FullDecodeText(tokenizer, stops, eos), ChoiceText(tokenizer, stops=stops, eos_token_ids=eos)
        for token in ids:
            assert choice.add(token) == reference.add(token), (ids, stops)
            assert choice.text == reference.text and choice.finish_reason == reference.finish_reason, (ids, stops)
        if not choice.finished:
            assert choice.text == full
            assert choice.finish() == reference.flush(len(reference.text))


@pytest.fixture(scope="module")
def llama_like():
    """A small tokenizer built as Llama's is (SentencePiece-style BPE: spaces as "▁", bytes as <0xNN> tokens for
    characters outside its vocabulary, the first space stripped on decoding), trained here on the samples' ASCII."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    def spaces(tok: Tokenizer) -> Tokenizer:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return tok

    corpus = ["".join(c for c in s if ord(c) < 128) for s in SAMPLES] + ["the quick brown fox isn't lazy, is it? 42."]
    trained = spaces(Tokenizer(models.BPE(unk_token="<unk>")))
    trained.train_from_iterator(
        corpus * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = spaces(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def test_incremental_decoding_equals_full_decoding_with_a_llama_like_tokenizer(llama_like):
    """The window's context tokens matter here: a window's first "▁word" decodes without its space. Sequences are
    valid text (real text cut and spliced with whole tokens between its characters): an invalid run of <0xNN> tokens
    decodes as one replacement character per byte, depending on the whole run, so its earlier text changes and even
    the full decoding's own deltas do not add up to its final text. For the same reason the texts are compared only
    where whole: while "日本" arrives byte by byte, the full decoding reads "����", the incremental one "日���"."""
    import random

    rng = random.Random(7)
    eos = [llama_like.eos_token_id]
    vocab = llama_like.get_vocab()
    words = [i for token, i in vocab.items() if not token.startswith("<")]
    byte = {i for token, i in vocab.items() if token.startswith("<0x")}

    def between_characters(ids: list[int]) -> list[int]:  # places outside runs of byte tokens
        return [k for k in range(1, len(ids) + 1) if k == len(ids) or not (ids[k - 1] in byte and ids[k] in byte)]

    for i in range(400):
        ids = llama_like(rng.choice(SAMPLES) + " " + rng.choice(SAMPLES), add_special_tokens=False)["input_ids"]
        if i % 2:
            for _ in range(rng.randrange(1, 6)):
                ids.insert(rng.choice(between_characters(ids)), rng.choice(words + eos))
        ids = ids[: rng.choice(between_characters(ids))]
        full = llama_like.decode(ids, skip_special_tokens=True)
        stops = []
        if full and rng.random() < 0.5:
            start = rng.randrange(len(full))
            stops.append(full[start : start + rng.randrange(1, 5)])
        reference = FullDecodeText(llama_like, stops, eos)
        choice = ChoiceText(llama_like, stops=stops, eos_token_ids=eos)
        for token in ids:
            assert choice.add(token) == reference.add(token), (ids, stops)
            assert choice.finish_reason == reference.finish_reason, (ids, stops)
            if not reference.text.endswith("\ufffd"):
                assert choice.text == reference.text, (ids, stops)
        if not choice.finished:
            assert choice.finish() == reference.flush(len(reference.text))
