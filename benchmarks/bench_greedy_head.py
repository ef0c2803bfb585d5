"""Greedy tokens from a low-precision pass plus a float32 check (``models/greedy_head.py``) against float32 logits.

One swarm, two clients on it: one whose head checks a bfloat16 or int8 pass (``--force bf16|int8``, else as its
load-time measurement chose), one that computes every float32 logit. Their generations alternate (check, float32,
check, ...), so both see the same machine; each run's median gap between tokens and the head's own time (final
norm, LM head and argmax) are printed, then the ratio of the best runs and whether both chose the same tokens.

    python benchmarks/bench_greedy_head.py --model tiny --threads 1 [--push] [--force int8]
"""

from __future__ import annotations

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from common import base_parser, compare_client_heads, emit, set_threads

from nectar.models.greedy_head import FORMATS, LowPrecisionArgmax


def main() -> None:
    parser = base_parser(__doc__, results_group="greedy_head")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    parser.add_argument("--force", choices=FORMATS, help="this pass, whatever the load-time timing chose")
    args = parser.parse_args()
    set_threads(args.threads)
    chosen_at_load = "float32"

    def check_against_float32(clients: dict) -> None:
        nonlocal chosen_at_load
        checked = clients["checked"].head
        chosen_at_load = checked.greedy_argmax.format if checked.greedy_argmax else "float32"
        if args.force and chosen_at_load != args.force:
            checked.greedy_argmax = LowPrecisionArgmax(
                checked.lm_head.weight.t(), checked.lm_head.bias, format=args.force
            )
        clients["float32"].head.greedy_argmax = None

    figures, rows = compare_client_heads(args, ("checked", "float32"), check_against_float32)
    figures["chosen_at_load"], figures["pass"] = chosen_at_load, args.force or chosen_at_load
    rows += [
        (
            "check / float32",
            f"{figures['ratio']:.3f}x decode with the {figures['pass']} pass, same tokens: "
            f"{figures['same_tokens']}, chosen at load: {figures['chosen_at_load']}",
        )
    ]
    emit(
        f"greedy head, {args.model}, {args.nodes} nodes{', push' if args.push else ''}, {args.threads} thread(s)",
        rows,
        figures,
        args.json,
    )


if __name__ == "__main__":
    main()
