"""What a cheat does to the text, against what honest rounding already does (issue 21's "changes more than 1% of next
tokens" target, made precise for bfloat16 and float16).

Teacher-forced on natural text (this repository's docs, tokenized by the built-in model's tokenizer): the built-in
SmolLM2-135M's 30 blocks run KV-cached in float32 (the model itself) and in the claimed precision (an honest node);
each cheat is applied to the honest node's output. Per variant: the share of next tokens (argmax of the model's head)
that differ from float32's, and from the honest node's. An honest node of another hardware class differs from this
one by about as much as honest rounding differs from float32 (benchmarks/results/audit/cuda_h100: GPU node against
the CPU verifier), so a cheat's harm is what it changes against float32 beyond what the honest node changes.

    python benchmarks/audit/token_harm.py --tokens 3000 --json results/audit/token_harm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nectar.models import load_client_head, load_span, load_tokenizer

MODEL, BLOCKS = "smollm2-135m", 30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cheats(y: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    x = y.float()
    m = x.abs().mean()
    out = {
        f"noise {p:g}% of mean |x|": x + p / 100 * m * torch.randn(x.shape, generator=g, device=x.device)
        for p in (0.3, 1, 2, 3, 5)
    }
    top = x.abs().topk(4, dim=-1).indices
    for p in (1, 5):
        rest = x + p / 100 * m * torch.randn(x.shape, generator=g, device=x.device)
        out[f"top-4 kept, the rest +{p}% noise"] = rest.scatter(-1, top, x.gather(-1, top))
    return out


def corpus(tokenizer, chunk: int, total: int) -> list[list[int]]:
    root = Path(__file__).resolve().parents[2]
    text = "\n\n".join(p.read_text() for p in sorted((root / "docs").glob("*.md")))
    ids = tokenizer(text)["input_ids"]
    return [ids[i : i + chunk] for i in range(0, min(len(ids), total + chunk) - chunk, chunk)][: max(1, total // chunk)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000, help="next tokens compared per precision")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per teacher-forced session")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where both runs compute (float32 with TF32 off)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    device = args.device
    head, tokenizer = load_client_head(MODEL).to(device), load_tokenizer(MODEL)
    span32 = load_span(MODEL, 0, BLOCKS, dtype=torch.float32, device=device)
    chunks = corpus(tokenizer, args.chunk, args.tokens)
    began, result = time.time(), {}
    for dtype_name in args.dtypes:
        span = load_span(MODEL, 0, BLOCKS, dtype=DTYPES[dtype_name], device=device)
        g = torch.Generator(device).manual_seed(0)
        counts, n = {}, 0
        for ids in chunks:
            x = head.embed(torch.tensor([ids], device=device)).float()
            c32, c = span32.new_cache(1, len(ids)), span.new_cache(1, len(ids))
            for pos in range(len(ids)):  # one token per step, as a decoding node sees them
                with torch.inference_mode():
                    ref = head.logits(span32(x[:, pos : pos + 1], cache=c32)).argmax(-1)
                    y = span(x[:, pos : pos + 1].to(span.dtype), cache=c)
                    variants = {"honest": y} | cheats(y, g)
                    honest = head.logits(y.float()).argmax(-1)
                    for name, v in variants.items():
                        t = head.logits(v.to(span.dtype).float()).argmax(-1)
                        counts.setdefault(name, [0, 0])
                        counts[name][0] += int((t != ref).sum())
                        counts[name][1] += int((t != honest).sum())
                n += 1
            print(f"{dtype_name}: {n} tokens ({time.time() - began:.0f}s)", flush=True)
        result[dtype_name] = {
            "device": device,
            "tokens": n,
            "changed_vs_float32": {k: v[0] / n for k, v in counts.items()},
            "changed_vs_honest": {k: v[1] / n for k, v in counts.items()},
            "harm_beyond_honest": {k: (v[0] - counts["honest"][0]) / n for k, v in counts.items()},
        }
        print(json.dumps(result[dtype_name], indent=1), flush=True)
    if args.json:
        path = Path(args.json)
        if not path.is_absolute() and len(path.parts) <= 3:
            path = Path(__file__).parent.parent / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "result": result}, indent=1))


if __name__ == "__main__":
    main()
