"""Sums a py-spy ``--format raw --threads`` profile per thread: inclusive samples per frame, and the leaf frames.

python benchmarks/spy_summary.py node.raw [--top 40]
"""

from __future__ import annotations

import argparse
import collections


def frame_name(frame: str) -> str:
    """ "function (path/file.py:12)" -> "function file.py:12"; native frames stay as they are."""
    if " (" not in frame:
        return frame
    function, _, where = frame.partition(" (")
    return f"{function} {where.rstrip(')').rsplit('/', 1)[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    totals = collections.Counter()
    inclusive = collections.defaultdict(collections.Counter)
    leaves = collections.defaultdict(collections.Counter)
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            thread, samples = frames[0], int(count)
            totals[thread] += samples
            for name in {frame_name(frame) for frame in frames[1:]}:
                inclusive[thread][name] += samples
            leaves[thread][frame_name(frames[-1])] += samples
    for thread, samples in totals.most_common():
        print(f"\n== {thread}: {samples} samples")
        print("   inclusive:")
        for name, count in inclusive[thread].most_common(args.top):
            print(f"   {count:7d} {100 * count / samples:5.1f}%  {name[:150]}")
        print("   leaves:")
        for name, count in leaves[thread].most_common(args.top // 2):
            print(f"   {count:7d} {100 * count / samples:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    main()
