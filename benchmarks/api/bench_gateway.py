"""What the API gateway costs and how it behaves under load, measured in one run on one local swarm.

A swarm of two nodes serves a tiny Llama with SmolLM2's tokenizer (or ``--model smollm2-135m`` for the real one).
Printed, all from this run:

1. generated tokens/s (prefill included) of the client SDK called directly and, interleaved with it, through the
   gateway (openai client): the gateway's overhead as a ratio;
2. streaming: time to first token and total time;
3. a load test: C concurrent clients on ONE account, R requests each, with 1 and with 4 generation workers: requests/s,
   tokens/s, p50/p95 latency, and the book check (balance change == sum of usage x price, nothing held, never < 0).

    python benchmarks/api/bench_gateway.py [--model PATH_OR_NAME] [--clients 16] [--requests 4] [--tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

PRICE = 10  # micro-credits per token (the gateway's default)
ADMIN = {"Authorization": "Bearer nectar-devnet-api-admin"}


def chat_checkpoint(path: Path) -> str:
    from nectar.models import load_tokenizer, resolve_model
    from nectar.models.tiny import save_tiny_checkpoint

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    save_tiny_checkpoint(path, "llama", vocab_size=len(tokenizer), num_layers=8, hidden_size=128)
    tokenizer.save_pretrained(str(path))
    return str(path)


def funded_key(url: str, credits: str) -> tuple[str, int]:
    with httpx.Client(base_url=url, timeout=60) as h:
        body = h.post("/v1/accounts", json={"name": "bench"}).json()
        account = int(body["account"]["id"].removeprefix("acct-"))
        h.post(f"/v1/admin/accounts/{account}/credit", json={"credits": credits}, headers=ADMIN).raise_for_status()
        key = h.post(
            "/v1/account/keys",
            json={"rate_limit_per_minute": 1_000_000},
            headers={"Authorization": f"Bearer {body['api_key']}"},
        ).json()["api_key"]
    return key, account


def account(url: str, key: str) -> dict:
    return httpx.get(f"{url}/v1/account", headers={"Authorization": f"Bearer {key}"}, timeout=60).json()


def pct(values, q) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def load_test(url: str, model: str, *, clients: int, requests: int, tokens: int) -> dict:
    from openai import OpenAI

    key, _ = funded_key(url, "100")
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    before = account(url, key)["balance_micro"]
    samples, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            samples.append(account(url, key)["balance_micro"])
            time.sleep(0.2)

    def one_client(index: int):
        out = []
        for r in range(requests):
            began = time.perf_counter()
            result = client.completions.create(
                model=model,
                prompt=f"Request {index}-{r}: once upon a time",
                max_tokens=tokens,
                temperature=0.8,
                seed=index * 100 + r,
            )
            out.append((time.perf_counter() - began, result.usage.completion_tokens, result.usage.total_tokens))
        return out

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(one_client, range(clients)) for item in batch]
    elapsed = time.perf_counter() - began
    stop.set()
    watcher.join()
    after = account(url, key)
    charged = sum(total for _, _, total in results) * PRICE
    return {
        "requests": len(results),
        "seconds": elapsed,
        "rps": len(results) / elapsed,
        "tokens_per_s": sum(c for _, c, _ in results) / elapsed,
        "p50": statistics.median(r[0] for r in results),
        "p95": pct([r[0] for r in results], 0.95),
        "book_ok": before - after["balance_micro"] == charged and after["held_micro"] == 0 and min(samples) >= 0,
        "charged": charged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: a tiny Llama with SmolLM2's tokenizer")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens per request")
    parser.add_argument("--runs", type=int, default=5, help="sequential generations for the overhead figure")
    args = parser.parse_args()

    from openai import OpenAI

    from nectar.api.launch import ApiProcess, api_environment
    from nectar.client import DistributedModelForCausalLM
    from nectar.models import get_family, load_config, load_tokenizer, model_id_of, resolve_model
    from nectar.node.local_swarm import LocalSwarm

    work = Path(tempfile.mkdtemp(prefix="nectar-bench-api-"))
    model = args.model or chat_checkpoint(work / "tiny-chat")
    config = load_config(resolve_model(model))
    blocks = get_family(config).num_blocks(config)
    name = model_id_of(model)
    print(f"[bench] {name}: {blocks} blocks, 2 nodes; workdir {work}", flush=True)
    with LocalSwarm(workdir=work / "swarm", env={"NECTAR_HOME": str(work)}) as swarm:
        swarm.add_node(model, blocks=(0, blocks // 2), name="left", extra_args=["--throughput", "100"])
        swarm.add_node(model, blocks=(blocks // 2, blocks), name="right", extra_args=["--throughput", "100"])
        swarm.wait_for_blocks(model, blocks)
        tokenizer = load_tokenizer(resolve_model(model))
        prompt = "The history of the printing press"
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])

        sdk = DistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers)
        sdk.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: routes, caches
        sdk_time = sdk_tokens = api_time = api_tokens = 0.0
        loads = {}
        for workers in (1, 4):
            env = api_environment(
                home=work / f"api-{workers}",
                model=model,
                initial_peers=swarm.initial_peers,
                max_concurrent_generations=workers,
            )
            with ApiProcess(env=env, log_dir=work / f"api-{workers}") as api:
                if workers == 1:
                    key, _ = funded_key(api.url, "10")
                    client = OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0)
                    client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
                    for _ in range(args.runs):  # interleaved, so both see the same load on this machine
                        began = time.perf_counter()
                        sdk.generate(ids, max_new_tokens=args.tokens, do_sample=False, eos_token_id=-1)
                        sdk_time, sdk_tokens = sdk_time + time.perf_counter() - began, sdk_tokens + args.tokens
                        began = time.perf_counter()
                        # OpenAI has no ignore_eos: count what was produced
                        api_tokens += client.completions.create(
                            model=name, prompt=prompt, max_tokens=args.tokens, temperature=0
                        ).usage.completion_tokens
                        api_time += time.perf_counter() - began
                    sdk_tps, api_tps = sdk_tokens / sdk_time, api_tokens / api_time
                    sdk.shutdown()
                    began = time.perf_counter()
                    stream = client.completions.create(
                        model=name, prompt=prompt, max_tokens=args.tokens, temperature=0, stream=True
                    )
                    first = None
                    for chunk in stream:
                        if first is None and chunk.choices and chunk.choices[0].text:
                            first = time.perf_counter() - began
                    stream_total = time.perf_counter() - began
                loads[workers] = load_test(
                    api.url, name, clients=args.clients, requests=args.requests, tokens=args.tokens
                )

    print(f"\n[bench] generation through the SDK directly: {sdk_tps:.1f} tokens/s")
    print(
        f"[bench] generation through the gateway:       {api_tps:.1f} tokens/s (gateway/SDK = {api_tps / sdk_tps:.2f})"
    )
    print(
        f"[bench] streaming: first token after {first * 1000:.0f} ms, {args.tokens} tokens in "
        f"{stream_total * 1000:.0f} ms"
    )
    for workers, r in loads.items():
        print(
            f"[bench] load, {args.clients} clients x {args.requests} requests on one account, {workers} generation "
            f"worker(s): {r['rps']:.2f} req/s, {r['tokens_per_s']:.1f} tokens/s, p50 {r['p50']:.2f}s, "
            f"p95 {r['p95']:.2f}s; book {'exact' if r['book_ok'] else 'MISMATCH'} ({r['charged']} micro-credits)"
        )
    print(f"[bench] 4 workers / 1 worker throughput = {loads[4]['tokens_per_s'] / loads[1]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
