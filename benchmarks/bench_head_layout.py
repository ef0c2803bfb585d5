"""The client's LM head in [in, out] memory (what ``load_client_head`` does on CPU) against the usual [out, in].

One swarm, two clients on it: one as loaded, one whose head matrix is copied back into nn.Linear's usual layout.
Their generations alternate (new, usual, new, usual, ...), so both see the same machine; each run's median gap
between tokens and the head's own time are printed, then the ratio of the best runs.

    python benchmarks/bench_head_layout.py --model tiny --threads 1 [--push]
"""

from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from common import base_parser, compare_client_heads, emit, set_threads
from torch import nn

from nectar.models.cpu_blas import CpuMatmul


def usual_layout(clients: dict) -> None:
    clients["in-out"].head.matmul = CpuMatmul()  # PyTorch's BLAS on both sides: the layout alone differs
    for model in clients.values():
        model.head.greedy_argmax = None  # float32 logits on both sides (bench_greedy_head.py measures the check)
    usual = clients["usual"].head
    usual.lm_head.weight = nn.Parameter(usual.lm_head.weight.detach().contiguous(), requires_grad=False)


def main() -> None:
    parser = base_parser(__doc__, results_group="head_layout")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    args = parser.parse_args()
    set_threads(args.threads)
    figures, rows = compare_client_heads(args, ("in-out", "usual"), usual_layout)
    rows += [("in-out / usual", f"{figures['ratio']:.3f}x decode, same tokens: {figures['same_tokens']}")]
    emit(
        f"client LM head layout, {args.model}, {args.nodes} nodes{', push' if args.push else ''}, "
        f"{args.threads} thread(s)",
        rows,
        figures,
        args.json,
    )


if __name__ == "__main__":
    main()
