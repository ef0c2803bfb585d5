"""Prompt tuning through the swarm: trains a soft prompt on a few sentences and prints the loss falling.

    python examples/prompt_tuning.py                      # starts its own 2-node swarm of the built-in model
    NECTAR_INITIAL_PEERS=/ip4/... python examples/prompt_tuning.py --mode deep_ptune

Only the prompt embeddings are trained (on the client); gradients flow back through the nodes' backward RPC.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nectar.client import DistributedModelForCausalLM
from nectar.models import get_family, load_config, load_tokenizer, resolve_model
from nectar.node.local_swarm import LocalSwarm
from nectar.wire.peers import initial_peers

TEXTS = [
    "Nectar nodes host spans of transformer blocks and sign a receipt for every step.",
    "Clients pay nodes with cumulative vouchers that settle on chain in batches.",
    "The ledger commits a Merkle root of each epoch's receipts and spot-checks nodes.",
    "A node that signs two different outputs for the same step loses its stake.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=["ptune", "deep_ptune"], default="ptune")
    parser.add_argument("--prefix", type=int, default=8, help="soft prompt length")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    input_ids = batch["input_ids"]
    labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding

    swarm = None
    peers = initial_peers(env=os.environ)
    if not peers:
        config = load_config(path)
        num_blocks = get_family(config).num_blocks(config)
        print(f"Starting a local swarm of 2 nodes for {args.model} ...")
        swarm = LocalSwarm()
        swarm.add_node(args.model, blocks=(0, num_blocks // 2), name="left")
        swarm.add_node(args.model, blocks=(num_blocks // 2, num_blocks), name="right")
        swarm.wait_for_blocks(args.model, num_blocks)
        peers = swarm.initial_peers
    model = DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=peers, tuning_mode=args.mode, pre_seq_len=args.prefix
    )
    try:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        began = time.perf_counter()
        for step in range(args.steps):
            loss, _ = model(input_ids, labels=labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
        print(f"{args.steps} steps in {time.perf_counter() - began:.1f}s")
        model.save_prompts("prompts.pt")
        print("Saved the trained prompts to prompts.pt (load with model.load_prompts)")
    finally:
        model.shutdown()
        if swarm is not None:
            swarm.close()


if __name__ == "__main__":
    main()
