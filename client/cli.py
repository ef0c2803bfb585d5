"""``nectar swarm``, ``nectar generate`` and ``nectar chat``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from nectar.cli_kit import (
    add_logging_options,
    add_options,
    add_swarm_option,
    config_values,
    options_of,
    setup_logging,
    swarm_file,
)
from nectar.client.config import ClientConfig
from nectar.wire.peers import SwarmFileError, initial_peers

PEERS = {"initial_peers": dict(nargs="*", default=None, metavar="MULTIADDR")}  # None: NECTAR_INITIAL_PEERS
DEFAULT_MODEL = "smollm2-135m"
CLIENT_OPTIONS = [name for name in options_of(ClientConfig) if name != "initial_peers"]  # generate and chat


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="built-in model name, local checkpoint directory, or Hugging Face Hub id (org/name; HF_HUB_OFFLINE=1: "
        f"from the cache only; default: the swarm file's model, else {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--revision", default=None, help="Hub branch, tag or commit of a Hub id --model (default: main)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Hugging Face token for gated or private Hub models (default: HF_TOKEN or `hf auth login`'s)",
    )
    add_options(parser, ClientConfig, ["initial_peers"], overrides=PEERS)
    add_swarm_option(parser)
    add_logging_options(parser, default="WARNING", verbose="INFO")


def _model(args: argparse.Namespace) -> str:
    """--model with --revision applied, resolved once now (a Hub id fetches its config, tokenizer and index, with the
    token remembered for the shards fetched later); exits with the reason if it cannot be found."""
    from nectar.models import ModelError, resolve_model, with_revision

    try:
        model = with_revision(args.model, args.revision)
        resolve_model(model, token=args.token)
    except (ModelError, ValueError) as error:
        raise SystemExit(f"nectar: {error}")
    return model


def _adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="NAME",
        help="a LoRA adapter nodes serve (`nectar swarm` lists them): computed with it, on nodes that serve it",
    )


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The ClientConfig of `nectar generate` / `nectar chat` (peers are passed apart: ``_peers``)."""
    return ClientConfig(**config_values(args, CLIENT_OPTIONS))


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses ``argv``; a model not given comes from the swarm file (``--swarm``, ``NECTAR_SWARM``) if it names one."""
    args = parser.parse_args(argv)
    if args.model is None:
        try:
            swarm = swarm_file(args.swarm, env=os.environ)
        except SwarmFileError as e:
            raise SystemExit(f"{parser.prog}: {e}") from None
        args.model = (swarm and swarm.model) or DEFAULT_MODEL
    return args


def _peers(args) -> list[str]:
    try:
        peers = initial_peers(args.initial_peers, env=os.environ, swarm=swarm_file(args.swarm, env=os.environ))
    except SwarmFileError as e:
        raise SystemExit(str(e)) from None
    if not peers:
        raise SystemExit(
            "No swarm to join: pass --swarm FILE (a swarm file) or --initial-peers MULTIADDR (printed by "
            "`nectar dht`/`nectar node`), or set NECTAR_SWARM or NECTAR_INITIAL_PEERS"
        )
    return peers


def swarm_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar swarm", description="Show who hosts which blocks of a model.")
    _common(parser)
    args = _parse(parser, argv)
    setup_logging(args, libraries="ERROR")
    args.model = _model(args)
    from nectar.models import get_family, load_config, model_id_of, resolve_model
    from nectar.wire.announce import ServerState
    from nectar.wire.dht import ClientRuntime
    from nectar.wire.swarm import read_swarm

    model_id = model_id_of(args.model)
    config = load_config(resolve_model(args.model))
    num_blocks = get_family(config).num_blocks(config)
    runtime = ClientRuntime(_peers(args))
    try:
        swarm = read_swarm(runtime, model_id, num_blocks)
    finally:
        runtime.shutdown()
    nodes = swarm.servers()
    print(f"{model_id}: {num_blocks} blocks, {len(nodes)} node(s)")
    print(
        f"{'node':<14} {'peer':<12} {'blocks':<9} {'state':<8} {'precision':<14} {'tok/s/blk':>10} "
        f"{'cache left':>11} {'price':>7}  address"
    )
    for peer_id, info in sorted(nodes.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        print(
            f"{info.public_name[:14]:<14} {str(peer_id)[-10:]:<12} {f'{info.start}:{info.end}':<9} "
            f"{ServerState(info.state).name:<8} {_precision(info):<14} {info.throughput:>10.1f} "
            f"{info.cache_tokens_left:>11} "
            f"{info.price_per_token:>7}  {info.eth_address}"
            + ("  (relayed)" if info.relayed else "")
            + (f"  adapters: {', '.join(info.adapters)}" if info.adapters else "")
        )
    missing = swarm.missing()
    if missing:
        print(f"Blocks with no online node: {missing}")
    return 0


def _precision(info) -> str:
    """dtype, and the weight quantization when there is one (float16+nf4)."""
    return info.dtype if info.quant == "none" else f"{info.dtype}+{info.quant}"


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)


def _sampling_kwargs(args) -> dict:
    do_sample = args.temperature is not None or args.top_k is not None or args.top_p is not None
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop,
        seed=args.seed,
    )


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nectar generate", description="Generate text through the swarm.")
    parser.add_argument("prompt")
    _common(parser)
    _adapter_arg(parser)
    add_options(parser, ClientConfig, CLIENT_OPTIONS)
    _sampling_args(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    return parser


def generate_main(argv: list[str]) -> int:
    args = _parse(generate_parser(), argv)
    setup_logging(args, libraries="ERROR")
    args.model = _model(args)
    from nectar.client import DistributedModelForCausalLM
    from nectar.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))
    model = DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=_peers(args), config=client_config(args), active_adapter=args.adapter
    )
    try:
        if args.chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = args.prompt
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat)["input_ids"]
        began, count = time.perf_counter(), 0
        sys.stdout.write(args.prompt if not args.chat else "")
        generated = []
        printed = ""
        for token in model.stream_generate(input_ids, tokenizer=tokenizer, **_sampling_kwargs(args)):
            generated.append(int(token[0]))
            count += 1
            text_now = tokenizer.decode(generated, skip_special_tokens=True)
            sys.stdout.write(text_now[len(printed) :])
            sys.stdout.flush()
            printed = text_now
        elapsed = time.perf_counter() - began
        print(f"\n[{count} tokens in {elapsed:.2f}s, {count / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    finally:
        model.shutdown()
    return 0


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nectar chat", description="Chat with a model served by the swarm.")
    _common(parser)
    _adapter_arg(parser)
    add_options(parser, ClientConfig, CLIENT_OPTIONS)
    _sampling_args(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    return parser


def chat_main(argv: list[str]) -> int:
    args = _parse(chat_parser(), argv)
    setup_logging(args, libraries="ERROR")
    args.model = _model(args)
    from nectar.client import DistributedModelForCausalLM
    from nectar.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))
    model = DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=_peers(args), config=client_config(args), active_adapter=args.adapter
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting through the swarm. Empty line or Ctrl-D to quit.")
    try:
        while True:
            try:
                user = input("you> ").strip()
            except EOFError:
                break
            if not user:
                break
            messages.append({"role": "user", "content": user})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            sys.stdout.write("assistant> ")
            generated, printed = [], ""
            for token in model.stream_generate(input_ids, tokenizer=tokenizer, **_sampling_kwargs(args)):
                generated.append(int(token[0]))
                text_now = tokenizer.decode(generated, skip_special_tokens=True)
                sys.stdout.write(text_now[len(printed) :])
                sys.stdout.flush()
                printed = text_now
            print()
            messages.append({"role": "assistant", "content": printed})
    finally:
        model.shutdown()
    return 0
