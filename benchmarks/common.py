"""Shared pieces of the speed benchmarks: the two random Llama checkpoints, thread settings, swarms, timing.

Every benchmark script imports this module from its own folder (``python benchmarks/bench_*.py``).

Threads: on a CPU box, every process that computes (local transformers, each node, the client's LM head) gets the
same ``--threads`` torch intra-op threads, so comparisons are like for like. Nodes of one route never compute at the
same time for a single session (the route is a pipeline), so each may use all cores. OpenMP worker threads spin for a
while after each parallel region, stealing cores from the next process in the route: nodes and the client therefore
run with ``OMP_WAIT_POLICY=PASSIVE`` (workers sleep at once), which cost nothing measurable on compute here. numpy's
OpenBLAS has the same habit: importing ``nectar`` sets ``OPENBLAS_THREAD_TIMEOUT`` (see ``core/__init__.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

# before torch loads libgomp (see the module docstring); a caller's explicit choice wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nectar  # noqa: E402,F401  (sets OpenBLAS's thread timeout before numpy loads)

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 16
NEW_TOKENS = 64
VOCAB = 32000
NUM_LAYERS = 8

# hidden, intermediate (the Llama 2 ratio, rounded to 32), attention heads
SIZES = {
    "tiny": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8),
    "mid": dict(hidden_size=2048, intermediate_size=5504, num_attention_heads=16),
    # the GPU run: Llama-2-7B's shape (32 layers of hidden 4096), random float16 weights
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
    # the 70B run (issue 25): Llama-2-70B's shape (80 layers of hidden 8192, 8 key-value heads), random nf4 weights
    # (benchmarks/prequantized.py: never a float checkpoint on disk)
    "llama2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80
    ),
}


def bench_dir() -> Path:
    path = Path(os.environ.get("NECTAR_BENCH_DIR", Path.home() / ".cache" / "nectar-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_config(size: str):
    from transformers import LlamaConfig

    spec = dict(SIZES[size])
    spec.setdefault("num_hidden_layers", NUM_LAYERS)
    spec.setdefault("num_key_value_heads", spec["num_attention_heads"])
    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **spec,
    )


def checkpoint(size: str, *, dtype: str = "float32", seed: int = 0, device: str = "cpu") -> Path:
    """A random-weight Llama checkpoint of ``size`` (built once, then reused from ``bench_dir()``).

    Saved as safetensors shards plus an index (what Nectar and Petals 2.2 both read from a local folder).
    :param device: where to draw the random weights (a GPU draws a 7B model in seconds)
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = bench_dir() / f"llama-{size}-{dtype}"
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return path
    log(f"building the random {size} checkpoint at {path}")
    torch.manual_seed(seed)
    config = llama_config(size)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(str(tmp), max_shard_size="2GB" if size not in ("tiny", "mid") else "500MB")
    del model
    _write_legacy_config(tmp / "config.json", config, dtype)
    tmp.rename(path)
    return path


def _write_legacy_config(config_path: Path, config, dtype: str) -> None:
    """Adds the keys older transformers (Petals pins 4.34) read, next to the ones transformers 5 wrote."""
    data = json.loads(config_path.read_text())
    data.setdefault("torch_dtype", dtype)
    data.setdefault("rope_theta", 10000.0)
    data.setdefault("rope_scaling", None)
    config_path.write_text(json.dumps(data, indent=2))


def set_threads(threads: int) -> None:
    from nectar.models.cpu_blas import use_threads

    use_threads(threads)  # PyTorch's and numpy's BLAS (the client head may use either)


def node_env(threads: int) -> dict:
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }


def with_session_cap(node_args: str, sessions: Sequence[int], clients: int = 1) -> str:
    """``node_args`` with ``--client-max-sessions`` raised where ``clients`` client keys open more ``sessions`` than
    a node holds for one client by default (a benchmark's client is one client, as a gateway is)."""
    from nectar.node.config import NodeConfig

    most = -(-max(sessions, default=0) // max(clients, 1))
    if most <= NodeConfig.client_max_sessions or "--client-max-sessions" in node_args:
        return node_args
    return f"{node_args} --client-max-sessions {most}".strip()


def even_spans(num_blocks: int, num_nodes: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / num_nodes) for i in range(num_nodes + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_nodes)]


@contextmanager
def local_swarm(
    model_path: Path,
    spans: Sequence[tuple[int, int]],
    *,
    threads: int,
    extra_args: Sequence[str] = (),
    device: str | None = None,
    dtype: str | None = None,
    env: dict | None = None,
) -> Iterator:
    """A bootstrap peer plus one node process per span, on 127.0.0.1 (nectar.node.local_swarm)."""
    from nectar.node.local_swarm import LocalSwarm

    args = [
        "--throughput",
        "1",
        "--num-threads",
        str(threads),
        "--announce-period",
        "5",
        "--cache-mb",
        "4096",
        *extra_args,
    ]
    if device:
        args += ["--device", device]
    if dtype:
        args += ["--dtype", dtype]
    with LocalSwarm(env={**node_env(threads), **(env or {})}, start_timeout=600) as swarm:
        for i, span in enumerate(spans):
            swarm.add_node(str(model_path), blocks=span, name=f"bench{i}", extra_args=args)
        swarm.wait_for_blocks(str(model_path), spans[-1][1], timeout=120)
        yield swarm


def distributed_model(
    model_path: Path,
    swarm,
    *,
    dtype=None,
    push: bool = False,
    receipts_ride: bool = True,
    voucher_interval: float = 0.25,
    **kwargs,
):
    """A client of ``swarm`` (a local swarm, or its initial peers' multiaddrs) with the benchmarks' timeouts."""
    import torch

    from nectar.client import ClientConfig, DistributedModelForCausalLM

    peers = swarm if isinstance(swarm, list | tuple) else swarm.initial_peers
    config = ClientConfig(
        step_timeout=120,
        request_timeout=300,
        connect_timeout=30,
        push=push,
        receipts_ride=receipts_ride,
        voucher_interval=voucher_interval,
    )
    return DistributedModelForCausalLM.from_pretrained(
        str(model_path), initial_peers=peers, config=config, dtype=dtype or torch.float32, **kwargs
    )


def prompt_ids(batch: int = 1, length: int = PROMPT_TOKENS, seed: int = 0):
    import torch

    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class TokenClock:
    """A ``generate()`` streamer that timestamps each new token (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if getattr(value, "is_cuda", False):
            import torch

            torch.cuda.synchronize()  # time the token, not the kernel launches
        if not self._seen_prompt:
            self._seen_prompt = True
            self.start = time.perf_counter()
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class DecodeTiming:
    """Tokens of one generation: time to the first token (prefill) and the gaps between later tokens (decode)."""

    first_token_s: float
    gaps_s: list[float]

    @property
    def decode_tps(self) -> float:
        return len(self.gaps_s) / sum(self.gaps_s)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.gaps_s) * 1e3

    @property
    def total_tps(self) -> float:
        return (len(self.gaps_s) + 1) / (self.first_token_s + sum(self.gaps_s))

    @classmethod
    def from_clock(cls, clock: TokenClock) -> DecodeTiming:
        times = clock.times
        return cls(times[0] - clock.start, [b - a for a, b in zip(times, times[1:])])


def timed(function, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up."""
    function()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return best


def timed_head(model) -> list[float]:
    """Wraps the client head's greedy choice (``greedy_tokens``: the LM head and its argmax) to record each call's
    seconds into the returned list."""
    seconds, greedy_tokens = [], model.head.greedy_tokens

    def timed(hidden):
        began = time.perf_counter()
        result = greedy_tokens(hidden)
        seconds.append(time.perf_counter() - began)
        return result

    model.head.greedy_tokens = timed
    return seconds


def alternating_decode(clients: dict, repeats: int) -> tuple[dict, dict]:
    """Greedy generations of each client in turn (a, b, a, b, ...), so all see the same moments of a noisy machine.

    Returns ({name: [DecodeTiming per run]}, {name: the last run's tokens}); one short warm-up each first.
    """
    runs, tokens = {name: [] for name in clients}, {}
    for model in clients.values():
        model.generate(prompt_ids(), max_new_tokens=4, do_sample=False, eos_token_id=[])
    for _ in range(repeats):
        for name, model in clients.items():
            clock = TokenClock()
            tokens[name] = model.generate(
                prompt_ids(), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], streamer=clock
            )
            runs[name].append(DecodeTiming.from_clock(clock))
    return runs, tokens


def compare_client_heads(args, names: tuple[str, str], prepare: Callable[[dict], None]) -> tuple[dict, list]:
    """One swarm of ``args.nodes`` nodes and two clients of it, named ``names`` (new, baseline); ``prepare(clients)``
    sets up their heads. Their generations alternate (``alternating_decode``). Returns (figures, rows): each client's
    best rate, runs' median gaps and head time (``timed_head``), the new/baseline ratio and whether both chose the
    same tokens."""
    path = checkpoint(args.model)
    with local_swarm(path, even_spans(NUM_LAYERS, args.nodes), threads=args.threads) as swarm:
        clients = {name: distributed_model(path, swarm, push=args.push) for name in names}
        prepare(clients)
        head_seconds = {name: timed_head(model) for name, model in clients.items()}
        try:
            runs, tokens = alternating_decode(clients, max(args.repeats, 2))
        finally:
            for model in clients.values():
                model.shutdown()
    fastest = {name: best(timings) for name, timings in runs.items()}
    head_ms = {name: statistics.median(seconds) * 1e3 for name, seconds in head_seconds.items()}
    new, baseline = names
    figures = {
        "model": args.model,
        "threads": args.threads,
        "nodes": args.nodes,
        "push": args.push,
        "ratio": fastest[new].decode_tps / fastest[baseline].decode_tps,
        "same_tokens": tokens[new].tolist() == tokens[baseline].tolist(),
        **{
            name: {
                "decode_tps": fastest[name].decode_tps,
                "head_ms": head_ms[name],
                "run_medians_ms": [t.median_ms for t in runs[name]],
            }
            for name in names
        },
    }
    rows = [
        (
            name,
            f"{fastest[name].decode_tps:.1f} tok/s (best run), runs' median gaps "
            f"{', '.join(f'{t.median_ms:.1f}' for t in runs[name])} ms; head {head_ms[name]:.2f} ms",
        )
        for name in names
    ]
    return figures, rows


def agreeing_tokens(tokens, reference) -> int:
    """How many leading ids two greedy sequences (lists or 1-D tensors) share: where random weights leave the
    next-token logits nearly flat, two paths' roundings part at some token, and this says where."""
    tokens, reference = list(tokens), list(reference)
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def best(timings: list[DecodeTiming]) -> DecodeTiming:
    """The run with the highest decode rate (the machine is shared: slower runs measure the neighbours)."""
    return max(timings, key=lambda t: t.decode_tps)


def median_timing(timings: list[DecodeTiming]) -> DecodeTiming:
    ordered = sorted(timings, key=lambda t: t.decode_tps)
    return ordered[len(ordered) // 2]


def machine_line() -> str:
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:
        cpu = platform.processor() or "unknown cpu"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()} | {os.cpu_count()} cores ({cpu}) | {gpu} | torch {torch.__version__} | "
        f"python {platform.python_version()} | {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except Exception:
        return "?"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_path(value: str, group: str) -> Path:
    """A bare file name lands in ``benchmarks/results/<group>/`` (one folder per benchmark); a path is kept."""
    path = Path(value)
    return RESULTS_DIR / group / path if len(path.parts) == 1 else path


def base_parser(description: str, *, results_group: str) -> argparse.ArgumentParser:
    """The options every benchmark shares; ``results_group`` names its folder under ``benchmarks/results/``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny", help="which random checkpoint")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="torch threads of every computing process (local, each node, the client)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (the best is reported)")
    parser.add_argument(
        "--json",
        type=lambda value: results_path(value, results_group),
        default=None,
        help=f"also write the figures to this JSON file (a bare name goes to results/{results_group}/)",
    )
    return parser


def emit(title: str, rows: list[tuple[str, str]], figures: dict, json_path: Path | None) -> None:
    """Prints a result table (figures and ratios) and optionally saves the raw figures."""
    width = max(len(name) for name, _ in rows) + 2
    print(f"\n== {title}")
    print(f"   machine: {machine_line()} | commit {git_commit()}")
    for name, value in rows:
        print(f"   {name:<{width}} {value}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"title": title, "machine": machine_line(), "figures": figures}, indent=2))
