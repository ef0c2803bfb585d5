"""After the test process died of a signal: the faulting thread's stack from faulthandler's dump in its stderr.

faulthandler lists every thread, newest first, and marks the faulting one "Current thread"; with many threads the
dump is long and a CI log cut in the middle loses that mark. This prints the marked block last, where a log's tail
keeps it, or says that no Python thread was marked (the fault was then in a thread Python did not start: torch's
OpenMP workers, libuv's pool and the like).

    python scripts/fault_summary.py STDERR_FILE SIGNAL
"""

from __future__ import annotations

import re
import sys

_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ ")


def summary(text: str, signal: int) -> str:
    start = text.rfind("Fatal Python error:")
    if start < 0:
        return f"[test] pytest died of signal {signal}, and its stderr holds no faulthandler dump"
    dump = text[start:].splitlines()
    blocks: list[list[str]] = []
    for line in dump[1:]:
        if _THREAD.match(line):
            blocks.append([line])
        elif blocks and line.startswith("  "):
            blocks[-1].append(line)
    current = [block for block in blocks if block[0].startswith("Current thread")]
    lines = [f"[test] pytest died of signal {signal}: {dump[0]} ({len(blocks)} Python threads in the dump)"]
    if current:
        lines += ["[test] the faulting thread:", *current[0]]
    else:
        lines.append(
            "[test] no Python thread is marked as the faulting one: the fault was in a thread Python did not start "
            "(torch's OpenMP workers, libuv's pool, ...)"
        )
    if blocks:  # the main thread is listed last: its frames in tests/ name the test that was running
        in_tests = [line.strip() for line in blocks[-1] if "/tests/" in line]
        lines.append("[test] the main thread was in: " + (" <- ".join(in_tests) if in_tests else "no frame of tests/"))
    return "\n".join(lines)


def main() -> None:
    path, signal = sys.argv[1], int(sys.argv[2])
    with open(path, errors="replace") as f:
        print(summary(f.read(), signal))


if __name__ == "__main__":
    main()
