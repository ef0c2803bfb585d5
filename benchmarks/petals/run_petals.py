"""Runs Petals 2.2.0.post1 pieces inside the Petals virtual environment (see setup_venv.sh); never imports Nectar.

    python run_petals.py check                      # patches, imports petals, prints versions
    python run_petals.py dht                        # a bootstrap DHT peer on 127.0.0.1; prints its address
    python run_petals.py server -- <petals run_server arguments>
    python run_petals.py bench --model PATH --peers ADDR --prefix P --threads T --repeats R

``bench`` prints one JSON line: single-session greedy decode (16-token prompt, 64 new tokens) through the Petals
swarm and through this environment's local transformers, and prompt-tuning step times (same workload as
benchmarks/bench_training.py).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as Nectar's nodes (benchmarks/common.py says why)

import argparse
import json
import logging
import runpy
import sys
import time

logger = logging.getLogger(__name__)

PROMPT_TOKENS, NEW_TOKENS, VOCAB = 16, 64, 32000
TUNE_SHAPE, PREFIX = (4, 64), 16


def patch() -> None:
    """Makes hivemind 1.1.10 importable on torch 2.13 and keeps Petals from calling PyPI at start-up."""
    import torch.amp.grad_scaler as amp_scaler
    import torch.cuda.amp.grad_scaler as cuda_scaler

    for name in ("OptState", "_refresh_per_optimizer_state"):
        if not hasattr(cuda_scaler, name):
            setattr(cuda_scaler, name, getattr(amp_scaler, name))
    import petals.utils.version

    petals.utils.version.validate_version = lambda: None
    import petals.cli.run_server

    petals.cli.run_server.validate_version = lambda: None


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def check() -> None:
    patch()
    import hivemind
    import petals
    import torch
    import transformers

    print(f"petals {petals.__version__}, hivemind {hivemind.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")


def dht() -> None:
    patch()
    import hivemind

    node = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    for address in node.get_visible_maddrs():
        print(address, flush=True)
    while True:
        time.sleep(3600)


def server(argv: list[str]) -> None:
    patch()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        set_threads(threads)
    sys.argv = ["petals.cli.run_server", *argv]
    runpy.run_module("petals.cli.run_server", run_name="__main__")


class TokenClock:
    def __init__(self):
        self.times, self.start, self._prompt_seen = [], None, False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen, self.start = True, time.perf_counter()
        else:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def timing(self) -> dict:
        return {"first": self.times[0] - self.start, "gaps": [b - a for a, b in zip(self.times, self.times[1:])]}


def _prompt(batch: int = 1, length: int = PROMPT_TOKENS, seed: int = 0):
    import torch

    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, repeats: int) -> tuple[list[dict], list]:
    import torch

    ids = _prompt()
    timings, tokens = [], None
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            clock = TokenClock()
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    streamer=clock)
            timings.append(clock.timing())
    return timings, tokens.tolist()


def _wait_until_served(model, timeout: float = 600) -> None:
    """Servers announce blocks before they finish loading them: retry a tiny generation until it goes through."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            model.generate(_prompt(length=2), max_new_tokens=1, do_sample=False)
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for the Petals servers: {type(e).__name__}", file=sys.stderr, flush=True)
            time.sleep(5)


def _tune_steps(model, repeats: int) -> list[float]:
    import torch

    ids = _prompt(*TUNE_SHAPE, seed=2)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        began = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times[1:]


def bench(args) -> None:
    patch()
    set_threads(args.threads)
    import torch
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoModelForCausalLM

    result = {}
    common = dict(initial_peers=[args.peers], dht_prefix=args.prefix, torch_dtype=torch.float32)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, **common)
    model.generation_config.eos_token_id = None
    _wait_until_served(model)
    result["petals_decode"], result["petals_tokens"] = _decode(model, args.repeats)
    tuned = AutoDistributedModelForCausalLM.from_pretrained(args.model, tuning_mode="ptune", pre_seq_len=PREFIX,
                                                            **common)
    result["petals_tune_s"] = _tune_steps(tuned, args.repeats)
    local = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    local.generation_config.eos_token_id = None
    result["local_decode"], result["local_tokens"] = _decode(local, args.repeats)
    import transformers

    result["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check", "dht", "server", "bench"])
    parser.add_argument("--model")
    parser.add_argument("--peers")
    parser.add_argument("--prefix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        server(sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] == "--" else sys.argv[2:])
        return
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    {"check": check, "dht": dht, "bench": lambda: bench(args)}[args.command]()


if __name__ == "__main__":
    main()
