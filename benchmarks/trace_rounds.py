"""Where a node's decode rounds spend their time, from a trace (a node run with ``NECTAR_TRACE=FILE``).

For each round of at least ``--min-steps`` steps that follows another such round, from the trace's events:
  compute      the compute thread's round (launch, kernels, copy back)
  outputs      from the round's end to the last of its outputs written to its socket (event loop, one step after
               another)
  clients      from that last output to the last next request taken by the node (the clients' own turnaround,
               plus requests waiting behind the loop's other work)
  start        from the last request submitted to the next round's start (gathering, thread wake-up)
Prints the medians in ms.

    NECTAR_TRACE=/tmp/trace.jsonl python benchmarks/bench_gpu.py --one-node-only ...
    python benchmarks/trace_rounds.py /tmp/trace.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics


def rounds_of(path: str) -> list[dict]:
    events = [json.loads(line) for line in open(path)]
    rounds, current = [], None
    for kind, at, key, value in events:
        if kind == "round":
            current = {"start": at, "steps": value, "sent": [], "taken": [], "submitted": []}
            rounds.append(current)
        elif kind == "round_end" and current is not None:
            current["end"] = at
        elif current is not None and "end" in current and kind in ("sent", "taken", "submitted"):
            current[kind].append(at)  # after this round's end, before the next round starts
    return [r for r in rounds if "end" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--min-steps", type=int, default=12)
    args = parser.parse_args()
    rounds = rounds_of(args.trace)
    rows = {"round": [], "compute": [], "outputs": [], "clients": [], "start": []}
    for this, following in zip(rounds, rounds[1:]):
        if this["steps"] < args.min_steps or following["steps"] < args.min_steps or not this["sent"]:
            continue
        last_sent = max(this["sent"])
        rows["round"].append(following["start"] - this["start"])
        rows["compute"].append(this["end"] - this["start"])
        rows["outputs"].append(last_sent - this["end"])
        if this["taken"] and this["submitted"]:
            rows["clients"].append(max(this["taken"]) - last_sent)
            rows["start"].append(following["start"] - max(this["submitted"]))
    print(f"{len(rows['round'])} rounds of >= {args.min_steps} steps; medians in ms:")
    for name, values in rows.items():
        if values:
            p90 = sorted(values)[int(0.9 * len(values))]
            print(f"  {name:8s} {1e3 * statistics.median(values):7.2f}   (p90 {1e3 * p90:7.2f})")


if __name__ == "__main__":
    main()
