"""Runs the Solidity suite (`forge test`: unit, fuzz and invariant tests) so the one pytest command covers it."""

from __future__ import annotations

import re
import subprocess

from nectar.chain.artifacts import repo_root, tool_path


def test_forge_test_passes():
    result = subprocess.run([tool_path("forge"), "test"], cwd=repo_root(), capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = re.search(r"(\d+) tests passed, (\d+) failed, (\d+) skipped", output)
    assert summary, output[-3000:]
    passed, failed, skipped = map(int, summary.groups())
    assert passed >= 90 and failed == 0 and skipped == 0, summary.group(0)
    assert re.search(r"testFuzz_\w+\(.*\) \(runs: 256", output), "fuzz tests did not run"
    assert re.search(r"invariant_\w+\(\) \(runs: \d+, calls: \d+", output), "invariant tests did not run"
