"""scripts/fault_summary.py: after a native fault kills a Python process, the faulting thread's stack and the test
the main thread ran are printed last (what scripts/test.sh shows when pytest dies of a signal)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_summary.py"

CRASH = textwrap.dedent(
    """
    import ctypes, faulthandler, threading, time
    faulthandler.enable(all_threads=True)

    def test_that_crashes():
        def faulting_worker():
            time.sleep(0.5)
            ctypes.string_at(0)  # reads address 0: SIGSEGV in this thread

        threading.Thread(target=faulting_worker).start()
        for _ in range(4):  # newer threads: the dump lists them before the faulting one (and the main thread after)
            threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
        time.sleep(10)

    test_that_crashes()
    """
)


def test_the_faulting_thread_and_the_running_test_come_last(tmp_path):
    (tmp_path / "tests").mkdir()
    script = tmp_path / "tests" / "crash.py"
    script.write_text(CRASH)
    crashed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -signal.SIGSEGV, crashed.stderr
    stderr = tmp_path / "stderr.txt"
    stderr.write_text("....." + crashed.stderr)  # pytest's dots precede the dump on its line
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(stderr), str(int(signal.SIGSEGV))], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith(
        "[test] pytest died of signal 11: Fatal Python error: Segmentation fault (6 Python threads"
    )
    faulting = out.index("[test] the faulting thread:")
    assert out[faulting + 1].startswith("Current thread 0x")
    block = out[faulting + 1 : -1]  # that thread's frames only: string_at, faulting_worker and threading's three
    assert len(block) == 6 and "in faulting_worker" in block[2], block
    assert out[-1].startswith("[test] the main thread was in: ") and "in test_that_crashes" in out[-1]


def test_a_fault_outside_python_threads_is_named_as_such(tmp_path):
    stderr = tmp_path / "stderr.txt"
    stderr.write_text(
        "....Fatal Python error: Segmentation fault\n\n"
        "Thread 0x00007f0000000001 (most recent call first):\n  <no Python frame>\n\n"
        'Thread 0x00007f0000000002 (most recent call first):\n  File "/x/tests/ledger/test_a.py", line 3 in test_b\n'
    )
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(stderr), "11"], capture_output=True, text=True, check=True
    ).stdout
    assert "(2 Python threads in the dump)" in out
    assert "no Python thread is marked as the faulting one" in out
    assert 'the main thread was in: File "/x/tests/ledger/test_a.py", line 3 in test_b' in out
    empty = tmp_path / "empty.txt"
    empty.write_text("no dump here\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(empty), "9"], capture_output=True, text=True).stdout
    assert "died of signal 9, and its stderr holds no faulthandler dump" in out
