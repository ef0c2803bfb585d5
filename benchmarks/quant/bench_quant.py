"""Weight quantization per mode (issue 23, item 3): memory per block, decode speed, perplexity against full precision.

For each ``--modes`` entry (none, int8, nf4; ``nectar.models.quant``) it loads one span of all the model's blocks
with ``load_span(..., quantization=mode)`` and measures:

- memory per block: bytes of one block's parameters, buffers and bitsandbytes' 4-bit state (``module_bytes``);
- decode tok/s: one sequence, a prefill of ``--prompt`` tokens then ``--tokens`` KV-cached single-token steps through
  the whole span (``BlockSpan.forward``: the generic path every mode takes on a node), per ``--threads`` entry on a
  CPU, on the device's own on a GPU;
- perplexity (the built-in model only): next-token perplexity of a fixed public-domain text
  (``pride_and_prejudice_ch1.txt``, Austen 1813) in ``--window``-token windows, the client head in float32, and the
  share of positions whose greedy token agrees with full precision's.

``--shape llama2-7b`` builds a random-weight Llama-2-7B-shaped checkpoint of ``--blocks`` blocks instead (memory and
decode only: random weights have no meaningful perplexity). No network needed.

    python benchmarks/quant/bench_quant.py --out benchmarks/results/quant/cpu_smollm2.json
    python benchmarks/quant/bench_quant.py --device cuda --shape llama2-7b --out .../gpu_h100_llama2-7b.json
    python benchmarks/quant/bench_quant.py --device cuda --out .../gpu_h100_smollm2.json   # perplexity on the GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import nectar  # noqa: E402,F401

HERE = Path(__file__).resolve().parent
TEXT = HERE / "pride_and_prejudice_ch1.txt"
SHAPES = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)}


def log(message: str) -> None:
    print(f"[bench_quant {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shaped_checkpoint(shape: str, blocks: int, dtype: torch.dtype, device: str) -> Path:
    """A random-weight checkpoint of ``shape`` with ``blocks`` blocks, built once under ~/.cache/nectar-bench."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = Path(os.environ.get("NECTAR_BENCH_DIR", Path.home() / ".cache" / "nectar-bench"))
    path = root / f"quant-{shape}-{blocks}blocks-{str(dtype).removeprefix('torch.')}"
    if (path / "config.json").exists():
        return path
    log(f"building a random {shape}-shaped checkpoint of {blocks} blocks at {path}")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(str(tmp), max_shard_size="2GB")
    del model
    tmp.rename(path)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_run(span, hidden: torch.Tensor, prompt: int, tokens: int, device: str) -> float:
    """Seconds for ``tokens`` KV-cached single-token steps after a ``prompt``-token prefill."""
    with torch.inference_mode():
        cache = span.new_cache(1, prompt + tokens)
        span(hidden[:, :prompt], cache=cache)
        sync(device)
        began = time.perf_counter()
        for position in range(prompt, prompt + tokens):
            span(hidden[:, position : position + 1], cache=cache)
        sync(device)
    return time.perf_counter() - began


def decode_speeds(spans: dict, *, prompt: int, tokens: int, device: str, repeats: int) -> dict:
    """Per mode, tok/s of the best of ``repeats`` runs. The modes take turns run by run (none, int8, nf4, none, ...)
    so that load from other processes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {mode: [] for mode in spans}
    hidden = {}
    for mode, span in spans.items():
        generator = torch.Generator().manual_seed(0)
        hidden[mode] = torch.randn(1, prompt + tokens, span.hidden_size, generator=generator).to(device, span.dtype)
        decode_run(span, hidden[mode], prompt, min(tokens, 4), device)  # warm-up: allocations, kernels
    for _ in range(repeats):
        for mode, span in spans.items():
            times[mode].append(decode_run(span, hidden[mode], prompt, tokens, device))
    return {
        mode: {
            "tok_s": tokens / min(runs),
            "ms_per_token": 1000 * min(runs) / tokens,
            "median_tok_s": tokens / sorted(runs)[len(runs) // 2],
            "runs_s": [round(t, 4) for t in runs],
        }
        for mode, runs in times.items()
    }


def perplexity(span, head, ids: torch.Tensor, window: int, device: str) -> dict:
    """Next-token perplexity over ``ids`` in non-overlapping windows; also each position's greedy token."""
    nll, count, greedy = 0.0, 0, []
    with torch.no_grad():
        for begin in range(0, ids.shape[0] - 1, window):
            chunk = ids[begin : begin + window + 1]
            if chunk.shape[0] < 2:
                break
            x = chunk[None, :-1].to(device)
            hidden = span(head.embed(x).to(span.dtype))
            logits = head.logits(hidden.to(head.dtype)).float()
            target = chunk[1:].to(device)
            nll += float(torch.nn.functional.cross_entropy(logits[0], target, reduction="sum"))
            count += target.shape[0]
            greedy.append(logits[0].argmax(-1).cpu())
    return {"perplexity": math.exp(nll / count), "tokens": count, "greedy": torch.cat(greedy)}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        info["cpu_count"] = os.cpu_count()
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        pass
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in model name or checkpoint folder")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a random-weight model of this shape")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the --shape span")
    parser.add_argument("--modes", default="none,int8,nf4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16; default float32 on CPU, float16 GPU"
    )
    parser.add_argument("--threads", default="1,2", help="torch threads to measure decode with (CPU)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from nectar.models import load_client_head, load_span, load_tokenizer, resolve_model
    from nectar.models.cpu_blas import use_threads
    from nectar.models.quant import module_bytes

    device = args.device
    dtype_name = args.dtype or ("float32" if device == "cpu" else "float16")
    dtype = getattr(torch, dtype_name)
    if args.shape:
        path = shaped_checkpoint(args.shape, args.blocks, dtype, device)
        model_name = f"random {args.shape}-shaped, {args.blocks} blocks"
    else:
        path = resolve_model(args.model)
        model_name = args.model
    threads = [int(t) for t in args.threads.split(",")] if device == "cpu" else [torch.get_num_threads()]
    ids = None
    if not args.shape:
        ids = load_tokenizer(path)(TEXT.read_text(), return_tensors="pt")["input_ids"][0]
        head = load_client_head(path, dtype=torch.float32, device=device)

    results = {
        "benchmark": "bench_quant",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(),
        "model": model_name,
        "device": device,
        "dtype": dtype_name,
        "modes": {},
    }
    spans, rows = {}, {}
    use_threads(max(threads))
    for mode in args.modes.split(","):
        log(f"{mode}: loading {model_name} ({dtype_name}, {device})")
        began = time.perf_counter()
        before = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        spans[mode] = span = load_span(path, 0, _num_blocks(path), dtype=dtype, device=device, quantization=mode)
        rows[mode] = {
            "load_s": round(time.perf_counter() - began, 2),
            "blocks": span.num_blocks,
            "bytes_per_block": module_bytes(span.blocks[0]),
            "bytes_all_blocks": module_bytes(span.blocks),
        }
        if device.startswith("cuda"):
            rows[mode]["cuda_allocated_bytes"] = torch.cuda.memory_allocated() - before
    for count in threads:
        use_threads(count)
        log(f"decode, {count} thread(s): {args.repeats} runs of {args.tokens} tokens per mode, modes in turn")
        key = f"decode_{count}t" if device == "cpu" else "decode"
        for mode, speed in decode_speeds(
            spans, prompt=args.prompt, tokens=args.tokens, device=device, repeats=args.repeats
        ).items():
            rows[mode][key] = speed
            log(f"{mode}: {speed['tok_s']:.2f} tok/s (best), {speed['median_tok_s']:.2f} (median), {count} threads")
    if ids is not None:
        use_threads(max(threads))
        reference_greedy = None
        for mode, span in spans.items():
            quality = perplexity(span, head, ids, args.window, device)
            greedy = quality.pop("greedy")
            if mode == "none":
                reference_greedy = greedy
            if reference_greedy is not None:
                quality["greedy_agreement_with_none"] = float((greedy == reference_greedy).float().mean())
            rows[mode].update(quality)
            log(f"{mode}: perplexity {quality['perplexity']:.3f}")
    results["modes"] = rows
    base = results["modes"].get("none")
    if base:
        for row in results["modes"].values():
            row["memory_vs_none"] = row["bytes_per_block"] / base["bytes_per_block"]
            if "perplexity" in row:
                row["perplexity_delta"] = row["perplexity"] - base["perplexity"]
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return results


def _num_blocks(path) -> int:
    from nectar.models import get_family, load_config

    config = load_config(path)
    return get_family(config).num_blocks(config)


if __name__ == "__main__":
    main()
