"""The attack benchmark runs end to end on a real tiny swarm and writes its row (numbers are the benchmark's job).
It runs the private configuration (no chain, no ledger): the market mode starts Anvil and the ledger, too slow here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attacks" / "bench_swarm_attacks.py"


def test_attack_benchmark_writes_a_row_per_attack(tmp_path):
    out = tmp_path / "attacks.json"
    env = {**os.environ, "NECTAR_BENCH_DIR": str(tmp_path / "bench")}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--attacks",
            "flood",
            "ledger",
            "--generations",
            "1",
            "--flood",
            "20",
            "--private",
        ]
        + ["--settle", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| flood |" in done.stdout and "| ledger |" in done.stdout
    rows = {row["attack"]: row for row in json.loads(out.read_text())["figures"]["rows"]}
    flood = rows["flood"]
    assert len(flood["generations"]) == 1 and flood["summary"]["success"] in ("0/1", "1/1")
    assert flood["attacker"].get("connects", 0) >= 1 or flood["outcome"].startswith("refused: "), flood
    assert flood["node_alive"] and flood["node_rss_mib"]["peak"] > 0
    assert rows["ledger"]["outcome"].startswith("not run")
