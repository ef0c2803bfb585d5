"""Runs Petals 2.2.0.post1 pieces inside the Petals virtual environment (see setup_venv.sh); never imports Nectar.

    python run_petals.py check                      # patches, imports petals, prints versions
    python run_petals.py dht                        # a bootstrap DHT peer on 127.0.0.1; prints its address
    python run_petals.py server -- <petals run_server arguments>
    python run_petals.py client --model PATH --peers ADDR --prefix P --threads T [--device cuda --dtype float16]

``client`` loads a Petals model and its prompt-tuning twin once, prints ``{"ready": true, ...}``, then answers one
JSON line per JSON request line on stdin, so another process can interleave Petals' runs with its own:
``{"decode": N}``: N single-session greedy decodes (16-token prompt, 64 new tokens) through the Petals swarm;
``{"tune": N}``: N prompt-tuning steps (the workload of benchmarks/bench_training.py); ``{"local": N}``: N decodes
with this environment's local transformers; ``{"sessions": N, "steps": S}``: N concurrent inference sessions, one
client thread each, sending hidden states (embeddings of random tokens, seeded as benchmarks/bench_concurrency.py
seeds Nectar's): a 16-token prefill each, then S single-token steps; answers the step latencies, each session's
finish time and the common start (``time.perf_counter``). With ``--device cuda`` the client's embeddings and LM head
run on the GPU (the servers get ``--device cuda`` themselves).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as Nectar's nodes (benchmarks/common.py says why)

import argparse
import gc
import json
import logging
import runpy
import sys
import threading
import time

logger = logging.getLogger(__name__)

PROMPT_TOKENS, NEW_TOKENS, VOCAB = 16, 64, 32000
TUNE_SHAPE, PREFIX = (4, 64), 16


def patch() -> None:
    """Makes hivemind 1.1.10 importable on torch >= 2.3 and keeps Petals from calling PyPI at start-up."""
    _hide_triton_without_ops()
    import torch.amp.grad_scaler as amp_scaler
    import torch.cuda.amp.grad_scaler as cuda_scaler

    for name in ("OptState", "_refresh_per_optimizer_state"):
        if not hasattr(cuda_scaler, name) and hasattr(amp_scaler, name):
            setattr(cuda_scaler, name, getattr(amp_scaler, name))
    import petals.utils.version

    petals.utils.version.validate_version = lambda: None
    _guard_session_finalizer()
    import petals.cli.run_server

    petals.cli.run_server.validate_version = lambda: None


def _hide_triton_without_ops() -> None:
    """bitsandbytes 0.41 (Petals' pin) imports ``triton.ops`` wherever Triton is installed; Triton 3 removed it, and
    the machine's Triton (Nectar's test extras) shows through the venv. Petals uses no Triton kernel: hide it."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    try:
        ops = importlib.util.find_spec("triton.ops")
    except ImportError:
        ops = None
    if ops is None:
        for name in [name for name in sys.modules if name == "triton" or name.startswith("triton.")]:
            del sys.modules[name]
        sys.modules["triton"] = None  # find_spec answers None, import raises ImportError


UNCLOSED = {"count": 0}


def _guard_session_finalizer() -> None:
    """Petals 2.2's ``_ServerInferenceSession.__del__`` closes a stream left open by waiting on hivemind's client event
    loop; when the garbage collector runs it on that loop's own thread, it waits on itself forever (seen here with
    concurrent sessions: the client hung). Such a finalizer now counts the session and leaves its stream to the
    server's timeout; sessions closed in the usual way are untouched."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client.inference_session import _ServerInferenceSession

    def finalize(session) -> None:
        if getattr(session, "_outputs_stream", None) is None:
            return
        if threading.current_thread() is RemoteExpertWorker._event_thread:
            UNCLOSED["count"] += 1
            return
        session.close()

    _ServerInferenceSession.__del__ = finalize


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def check() -> None:
    patch()
    import hivemind
    import petals
    import torch
    import transformers

    print(
        f"petals {petals.__version__}, hivemind {hivemind.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}"
    )


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
        if getattr(value, "is_cuda", False):
            import torch

            torch.cuda.synchronize()  # time the token, not the kernel launches
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


def _decode(model, repeats: int, *, warm_up: bool = True, device: str = "cpu") -> tuple[list[dict], list]:
    import torch

    ids = _prompt().to(device)
    timings, tokens = [], None
    with torch.inference_mode():
        if warm_up:
            model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            clock = TokenClock()
            tokens = model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock
            )
            timings.append(clock.timing())
    return timings, tokens.tolist() if tokens is not None else None


def _wait_until_served(model, timeout: float = 600, device: str = "cpu") -> None:
    """Servers announce blocks before they finish loading them: retry a tiny generation until it goes through."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            model.generate(_prompt(length=2).to(device), max_new_tokens=1, do_sample=False)
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise
            print(f"waiting for the Petals servers: {type(e).__name__}", file=sys.stderr, flush=True)
            time.sleep(5)


def client(args) -> None:
    """Serves timed runs on request (one JSON line in, one out) until stdin closes."""
    patch()
    set_threads(args.threads)
    import torch
    import transformers
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoModelForCausalLM

    dtype, device = getattr(torch, args.dtype), args.device
    common = dict(initial_peers=[args.peers], dht_prefix=args.prefix, torch_dtype=dtype)
    if device != "cpu" or dtype == torch.float32:
        # Petals' "auto" asks cpufeature (no wheel for Python 3.12) whether to chunk a float16/bfloat16 head on the
        # CPU; a float32 or GPU head is never chunked, so saying so changes nothing and needs no cpufeature
        common["use_chunked_forward"] = False
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, **common).to(device)
    model.generation_config.eos_token_id = None
    _wait_until_served(model, device=device)
    _decode(model, 0, device=device)  # warm-up
    tuning = None
    if not args.no_tuning:
        tuned = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, tuning_mode="ptune", pre_seq_len=PREFIX, **common
        )
        tuning = _Tuning(tuned)
    print(
        json.dumps({"ready": True, "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}),
        flush=True,
    )
    for line in sys.stdin:
        request = json.loads(line)
        if "decode" in request:
            timings, tokens = _decode(model, request["decode"], warm_up=False, device=device)
            answer = {"timings": timings, "tokens": tokens}
        elif "sessions" in request:
            answer = sessions(model, request["sessions"], request.get("steps", NEW_TOKENS), device)
        elif "tune" in request and tuning is not None:
            answer = {"tune_s": [tuning.step() for _ in range(request["tune"])]}
        elif "local" in request:
            local = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device).eval()
            local.generation_config.eos_token_id = None
            timings, tokens = _decode(local, request["local"], device=device)
            answer = {"timings": timings, "tokens": tokens}
            del local
        else:
            answer = {"error": f"unknown request {request!r}"}
        gc.collect()  # here, not on the event loop's thread (see _guard_session_finalizer)
        answer["unclosed_sessions"] = UNCLOSED["count"]
        print(json.dumps(answer), flush=True)


def sessions(model, num_sessions: int, steps: int, device: str) -> dict:
    """``num_sessions`` concurrent inference sessions through the swarm, one thread each (the shape of
    bench_concurrency.py's ``_drive`` on Nectar's side: same seeds, prefill first, then all step together)."""
    import torch
    from petals.client.inference_session import InferenceSession

    embed, layers = model.get_input_embeddings(), model.transformer.h
    opened, inputs = [], []
    try:
        with torch.inference_mode():
            for index in range(num_sessions):
                generator = torch.Generator().manual_seed(1000 + index)
                prompt = embed(torch.randint(3, VOCAB, (1, PROMPT_TOKENS), generator=generator).to(device))
                inputs.append(embed(torch.randint(3, VOCAB, (1, steps), generator=generator).to(device)))
                session = InferenceSession(layers.sequence_manager, max_length=PROMPT_TOKENS + steps + 1)
                opened.append(session)
                session.step(prompt)
        latencies, finished, errors = [], [], []

        def client(index: int) -> None:
            try:
                with torch.inference_mode():  # thread-local
                    for t in range(steps):
                        began = time.perf_counter()
                        opened[index].step(inputs[index][:, t : t + 1])
                        latencies.append(time.perf_counter() - began)
                finished.append(time.perf_counter())
            except BaseException as e:  # reported to the caller
                errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(num_sessions)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for session in opened:
            session.close()
    return {"began": start, "latencies": latencies, "finished": finished, "errors": errors}


class _Tuning:
    """Prompt-tuning steps one at a time (the first call also runs a warm-up step)."""

    def __init__(self, model):
        import torch

        self.model, self.ids = model, _prompt(*TUNE_SHAPE, seed=2)
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        self.warm = False

    def step(self) -> float:
        if not self.warm:
            self.warm = True
            self.step()
        began = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check", "dht", "server", "client"])
    parser.add_argument("--model")
    parser.add_argument("--peers")
    parser.add_argument("--prefix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the client's embeddings and LM head run")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-tuning", action="store_true", help="skip loading the prompt-tuning twin")
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        server(sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] == "--" else sys.argv[2:])
        return
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    {"check": check, "dht": dht, "client": lambda: client(args)}[args.command]()


if __name__ == "__main__":
    main()
