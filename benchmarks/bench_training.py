"""Prefill (forward) tokens/s and prompt-tuning steps/s: Nectar through N nodes vs local transformers.

Prefill: a batch of 4 x 128 tokens through the embeddings, all blocks, and the LM head on the last position (locally
one ``model(...)`` call; through Nectar the first step of an inference session, as generation runs it).
Prompt tuning ("ptune"): a trainable 16-token soft prefix before 4 x 64 tokens; one step is forward, cross-entropy
on every real token's logits, backward to the prefix and an Adam update. The model's weights are frozen on both sides
(local transformers too), as prompt tuning does. Same checkpoint, float32, CPU and torch threads everywhere.

    python benchmarks/bench_training.py --model mid --nodes 2
"""

from __future__ import annotations

import logging

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch
from common import (
    NUM_LAYERS,
    base_parser,
    checkpoint,
    distributed_model,
    emit,
    even_spans,
    local_swarm,
    log,
    prompt_ids,
    set_threads,
    timed,
)

logger = logging.getLogger(__name__)

PREFILL_SHAPE = (4, 128)
TUNE_SHAPE = (4, 64)
PREFIX = 16


class LocalRunner:
    """transformers' LlamaForCausalLM with a trainable input prefix (what ``tuning_mode='ptune'`` does remotely)."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        hidden = self.model.config.hidden_size
        self.prefix = torch.nn.Parameter(torch.randn(PREFIX, hidden) * 0.02)
        self.optimizer = torch.optim.Adam([self.prefix], lr=1e-3)
        self.prefill_ids = prompt_ids(*PREFILL_SHAPE, seed=1)
        self.tune_ids = prompt_ids(*TUNE_SHAPE, seed=2)

    def prefill(self) -> None:
        with torch.inference_mode():
            self.model(self.prefill_ids, logits_to_keep=1)

    def tune_step(self) -> float:
        embeds = self.model.get_input_embeddings()(self.tune_ids)
        prefix = self.prefix.unsqueeze(0).expand(embeds.shape[0], -1, -1)
        logits = self.model(inputs_embeds=torch.cat([prefix, embeds], dim=1)).logits[:, PREFIX:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), self.tune_ids[:, 1:].reshape(-1)
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


class SwarmRunner:
    """The same two workloads through ``DistributedModelForCausalLM``."""

    def __init__(self, path, swarm):
        self.model = distributed_model(path, swarm, tuning_mode="ptune", pre_seq_len=PREFIX)
        self.plain = distributed_model(path, swarm)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.prefill_ids = prompt_ids(*PREFILL_SHAPE, seed=1)
        self.tune_ids = prompt_ids(*TUNE_SHAPE, seed=2)

    def prefill(self) -> None:
        """Through an inference session (what generation's prefill uses): the nodes fill their KV caches."""
        batch, length = self.prefill_ids.shape
        with torch.no_grad(), self.plain.inference_session(max_length=length, batch_size=batch) as session:
            hidden = session.step(self.plain.head.embed(self.prefill_ids))
            self.plain.head.logits(hidden[:, -1:])

    def tune_step(self) -> float:
        loss, _ = self.model(self.tune_ids, labels=self.tune_ids)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def close(self) -> None:
        self.model.shutdown()
        self.plain.shutdown()


def main() -> None:
    parser = base_parser(__doc__, results_group="training")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2], help="route lengths to measure")
    args = parser.parse_args()
    set_threads(args.threads)
    path = checkpoint(args.model)
    prefill_tokens = PREFILL_SHAPE[0] * PREFILL_SHAPE[1]
    local = LocalRunner(path)
    best = {"local": {"prefill_s": float("inf"), "tune_s": float("inf")}}
    for num_nodes in args.nodes:
        spans = even_spans(NUM_LAYERS, num_nodes)
        log(f"{num_nodes} node(s): spans {spans}")
        key = f"nodes{num_nodes}"
        best[key] = {"prefill_s": float("inf"), "tune_s": float("inf")}
        with local_swarm(path, spans, threads=args.threads) as swarm:
            remote = SwarmRunner(path, swarm)
            try:
                for repeat in range(args.repeats):  # alternate sides: the machine's load hits both alike
                    for name, runner in (("local", local), (key, remote)):
                        best[name]["prefill_s"] = min(best[name]["prefill_s"], timed(runner.prefill, 1))
                        best[name]["tune_s"] = min(best[name]["tune_s"], timed(runner.tune_step, 1))
                    log(
                        f"  repeat {repeat}: local prefill {best['local']['prefill_s']:.3f}s "
                        f"step {best['local']['tune_s']:.3f}s | nectar prefill {best[key]['prefill_s']:.3f}s "
                        f"step {best[key]['tune_s']:.3f}s"
                    )
            finally:
                remote.close()
    rows, figures = [], {"model": args.model, "threads": args.threads}
    base = best["local"]
    for name, result in best.items():
        prefill_tps, steps_s = prefill_tokens / result["prefill_s"], 1 / result["tune_s"]
        figures[name] = {
            "prefill_tps": prefill_tps,
            "tune_steps_s": steps_s,
            "prefill_ratio": base["prefill_s"] / result["prefill_s"],
            "tune_ratio": base["tune_s"] / result["tune_s"],
        }
        label = "local transformers" if name == "local" else f"nectar, {name[5:]} node(s)"
        rows.append(
            (
                label,
                f"prefill {prefill_tps:8.1f} tok/s ({figures[name]['prefill_ratio']:4.2f}x local)   "
                f"prompt tuning {steps_s:6.3f} steps/s ({figures[name]['tune_ratio']:4.2f}x local)",
            )
        )
    emit(
        f"Prefill {PREFILL_SHAPE[0]}x{PREFILL_SHAPE[1]} and prompt tuning ({PREFIX}-token prefix, "
        f"{TUNE_SHAPE[0]}x{TUNE_SHAPE[1]} tokens, Adam), {args.model}, float32 CPU, {args.threads} thread(s)",
        rows,
        figures,
        args.json,
    )


if __name__ == "__main__":
    main()
