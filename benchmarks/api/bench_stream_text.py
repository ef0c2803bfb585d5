"""The gateway's own per-token work on the event loop, without a swarm: for each generated token of each stream,
``ChoiceText.add`` (detokenizing, stop strings) and the SSE chunk of the text it releases, as the completions
endpoint builds it. CPU microseconds per token (best of ``--repeats``), for answers of several lengths, with
SmolLM2's tokenizer (byte-level BPE) and the word-level one ``bench_api_load.py`` gives its random checkpoint.

Run it against other code to compare (the chunk is a template where the code has ``templated_sse``, else a model
dump per token, as before):

    python benchmarks/api/bench_stream_text.py [--tokens 64 256 1024] [--stop STRING]
    PYTHONPATH=OTHER_TREE/.pkgroot python benchmarks/api/bench_stream_text.py
"""

from __future__ import annotations

import argparse
import random
import time


def word_tokenizer(vocab: int = 32000):
    """``t0`` ... ``tN``, as ``bench_api_load.with_tokenizer`` builds it (in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2"
    )


def stream_cost(tokenizer, ids: list[int], stops: list[str], repeats: int) -> float:
    """Best-of-``repeats`` microseconds per token of one stream's text and SSE work."""
    from nectar.api.protocol import CompletionStreamChoice, CompletionStreamResponse
    from nectar.api.serving import generation
    from nectar.api.text import ChoiceText

    def build(text: str) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id="cmpl-0123456789abcdef",
            created=1_700_000_000,
            model="llama-2-7b",
            choices=[CompletionStreamChoice(index=0, text=text, logprobs=None, finish_reason=None)],
        )

    templated = getattr(generation, "templated_sse", None)
    best = float("inf")
    for _ in range(repeats):
        templates: dict = {}
        began = time.process_time()  # CPU time: robust to a shared machine
        choice = ChoiceText(tokenizer, stops=stops)
        for token in ids:
            delta = choice.add(token)
            if delta:
                event = templated(templates, 0, build, delta) if templated else generation.sse(build(delta))
                assert event
        assert not choice.finished, "the stop string occurs in the text: pick another --stop"
        best = min(best, time.process_time() - began)
    return 1e6 * best / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument(
        "--stop", default="<|" + "stop|>", help="a stop string that never occurs ('' for none)"
    )  # split: the prose is this file's text
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import nectar.api.text
    from nectar.models import load_tokenizer, resolve_model

    print(f"code: {nectar.api.text.__file__}")
    smol = load_tokenizer(resolve_model("smollm2-135m"))
    prose = smol(open(__file__).read() * 8, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    words = [rng.randrange(3, 32000) for _ in range(max(args.tokens))]
    stops = [args.stop] if args.stop else []
    cases = (("smollm2 (this file's text)", smol, prose), ("word-level t0..tN", word_tokenizer(), words))
    stream_cost(smol, prose[:64], stops, 1)  # warm-up: imports, Pydantic's serializers
    for name, tokenizer, ids in cases:
        for n in args.tokens:
            print(f"{name:28s} {n:5d} tokens: {stream_cost(tokenizer, ids[:n], stops, args.repeats):8.1f} us/token")


if __name__ == "__main__":
    main()
