"""Honest generation under attack (issue 22): success rate and latency of an honest client while each attack of
``attackers.py`` runs in the background against a real tiny swarm, plus a row without attack.

By default the swarm runs in the real market (``market.py``): Anvil with the contracts, ``nectar ledger``, started once
for the run; the honest node registered and staked, reporting to the ledger and working only against escrow it checked
there; the honest client funded with escrow and a reserve for that node, routing with the stake gate; attackers with
throwaway keys and no escrow. The ledger row attacks the ledger itself (chunked oversized bodies, unfunded vouchers,
epochs closed meanwhile). ``--private`` runs the old configuration instead: no ledger, the node started with
``--trusted-clients`` (the honest client; strangers share a small free allowance; before issue 22's fixes,
``--trust-vouchers``, which granted --credit-limit to any signed client), no ledger row.

Each row starts a fresh swarm (a bootstrap peer and one honest node serving the whole tiny Llama, with a price and a
credit limit so that unpaid work is charged to someone), starts the attack, waits ``--settle`` s, then runs
``--generations`` greedy generations of ``--tokens`` tokens in a separate client process. A generation that takes
longer than ``--gen-timeout`` s counts as failed: its client is killed and a new one takes the next generation, so a
black-holed generation is a failure, never a hang. The node's memory (RSS of its process group) is sampled during the
row. An attack the node refuses is reported as ``refused: <error>``, and the benchmark goes on.

    python benchmarks/attacks/bench_swarm_attacks.py [--attacks baseline sybil ...] [--generations 3] [--tokens 16]
        [--private] [--json after.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/common.py
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (sets the OpenMP wait policy before torch loads)
from common import bench_dir, git_commit, log, machine_line, node_env, results_path  # noqa: E402

NUM_BLOCKS = 4  # the tiny Llama's blocks (nectar.models.tiny)
ROWS = ["baseline", "sybil", "rotate", "impersonate", "oversize", "cache", "flood", "ledger"]
NODE_ARGS = [
    "--throughput",
    "100",
    "--num-threads",
    "1",
    "--announce-period",
    "3",
    "--session-timeout",
    "15",
    "--cache-mb",
    "16",
    "--price",
    "1",
    "--credit-limit",
    "200000",
]
LEDGER_NOTE = (
    "not run: the ledger attacks (chunked bodies, unfunded vouchers) need Anvil, a deployment and the ledger "
    "service with its workers, far from cheap on 1 core; they are covered by the ledger attack tests"
)


def node_args(extra: list[str]) -> list[str]:
    """``NODE_ARGS`` plus the flags a paid node of this checkout needs to serve without a ledger: after issue 22 it
    refuses to start unless told to trust vouchers (each signed client then gets --credit-limit)."""
    from nectar.node.config import NodeConfig

    args = list(NODE_ARGS)
    if hasattr(NodeConfig, "trust_vouchers"):
        args.append("--trust-vouchers")
    return args + extra


PRIVATE_FREE_CREDIT = 10_000  # credit wei an hour all untrusted clients of a private node share (price 1: token-blocks)


def private_trust_args(client: str) -> list[str]:
    """A private node of this checkout trusts the honest client by address (``--trusted-clients``) and lets strangers,
    the attackers, share a small free allowance, so their attacks still reach it; the old switch trusted every key."""
    from nectar.node.config import NodeConfig

    if "trusted_clients" not in NodeConfig.__dataclass_fields__:
        return []
    return ["--trusted-clients", client, "--free-credit-per-hour", str(PRIVATE_FREE_CREDIT)]


def market_node_args(extra: list[str]) -> list[str]:
    """What the market node gets besides ``SwarmMarket.add_node``'s price, ledger URL, throughput and threads."""
    from market import CREDIT_LIMIT

    return ["--session-timeout", "15", "--cache-mb", "16", "--credit-limit", str(CREDIT_LIMIT)] + extra


def tiny_checkpoint() -> Path:
    from nectar.models.tiny import save_tiny_checkpoint

    path = bench_dir() / "attack-tiny-llama"
    if not (path / "config.json").exists():
        save_tiny_checkpoint(path, "llama", seed=0)
    return path


# ---- the honest client (a child process) --------------------------------------------------------------------------


def client_worker(args) -> None:
    import torch

    from nectar.client import ClientConfig, DistributedModelForCausalLM

    common.set_threads(1)
    config = ClientConfig(private_key=args.key, ledger_url=args.ledger_url or None)
    model = DistributedModelForCausalLM.from_pretrained(
        args.path, initial_peers=args.peers.split(","), config=config, dtype=torch.float32
    )
    print(json.dumps({"ready": True}), flush=True)
    prompt = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(args.generations):
        began = time.perf_counter()
        try:
            out = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False)
            ok = out.shape[1] == prompt.shape[1] + args.tokens
            result = {"ok": ok, "s": time.perf_counter() - began, "tokens": out[0, -args.tokens :].tolist()}
            if not ok:
                result["error"] = f"{out.shape[1] - prompt.shape[1]} tokens instead of {args.tokens}"
        except Exception as e:
            result = {"ok": False, "s": time.perf_counter() - began, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(result), flush=True)
    model.shutdown()


class HonestClient:
    """Runs generations in a child process, each under a deadline; a client that misses it is killed and replaced."""

    def __init__(
        self, path: Path, peers: list[str], key: str, tokens: int, start_timeout: float = 180, ledger_url: str = ""
    ):
        self.path, self.peers, self.key, self.tokens, self.start_timeout = path, peers, key, tokens, start_timeout
        self.ledger_url = ledger_url

    def _spawn(self, generations: int):
        process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client-worker",
                "--path",
                str(self.path),
                "--peers",
                ",".join(self.peers),
                "--key",
                self.key,
                "--tokens",
                str(self.tokens),
                "--generations",
                str(generations),
                "--ledger-url",
                self.ledger_url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **node_env(1)},
            start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return process, lines

    @staticmethod
    def _next(lines: queue.Queue, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return {"ok": False, "s": 0.0, "error": "the client process died"}
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # a stray print
        return None

    @staticmethod
    def _kill(process) -> None:
        import signal

        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    def run(self, generations: int, timeout: float) -> list[dict]:
        results: list[dict] = []
        while len(results) < generations:
            process, lines = self._spawn(generations - len(results))
            try:
                ready = self._next(lines, self.start_timeout)
                if not ready or not ready.get("ready"):
                    results.append({"ok": False, "s": 0.0, "error": f"client did not start: {ready}"})
                    continue
                while len(results) < generations:
                    result = self._next(lines, timeout)
                    if result is None:
                        results.append({"ok": False, "s": timeout, "error": f"no answer within {timeout:.0f}s"})
                        break  # kill it; a fresh client takes the rest
                    results.append(result)
                    if result.get("error") == "the client process died":
                        break
            finally:
                self._kill(process)
        return results


# ---- measuring the node ------------------------------------------------------------------------------------------


def group_rss_mib(pgid: int) -> float:
    """RSS of every process in the process group (the node, its DHT child and its P2P daemon)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 (pgrp), counted after the command name
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def open_fds(pid: int) -> int:
    """Open file descriptors of the node's main process (its connections among them)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class RssSampler(threading.Thread):
    def __init__(self, pgid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pgid, self.period = pgid, period
        self.start_mib = group_rss_mib(pgid)
        self.peak_mib = self.start_mib
        self.peak_fds = self.start_fds = open_fds(pgid)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            self.peak_mib = max(self.peak_mib, group_rss_mib(self.pgid))
            self.peak_fds = max(self.peak_fds, open_fds(self.pgid))

    def stop(self) -> float:
        self.stop_event.set()
        self.join(2)
        return group_rss_mib(self.pgid)


# ---- one row -----------------------------------------------------------------------------------------------------


def discover(swarm, path: Path, node) -> tuple[str, str, str]:
    """The honest node's peer id, direct lane and receipt address, read from its public announcement."""
    from hivemind.p2p import PeerID

    from nectar.models import model_id_of
    from nectar.wire.dht import ClientRuntime
    from nectar.wire.swarm import read_swarm

    peer_id = node.address.rsplit("/", 1)[-1]
    runtime = ClientRuntime(swarm.initial_peers)
    try:
        servers = read_swarm(runtime, model_id_of(str(path)), NUM_BLOCKS).servers()
        info = servers.get(PeerID.from_base58(peer_id))
        if info is None:
            return peer_id, "", ""
        return peer_id, info.direct_address, info.eth_address or node.eth_address
    finally:
        runtime.shutdown()


def run_row(name: str, args, path: Path, market=None) -> dict:
    """One row; ``market`` (a ``market.Market``) runs it in the market, None in the private configuration."""
    from attackers import ATTACKS, AttackRunner, Target
    from eth_account import Account

    from nectar.models import model_id_of
    from nectar.node.local_swarm import LocalSwarm

    if name == "ledger" and market is None:
        return {"attack": name, "outcome": LEDGER_NOTE, "generations": []}
    row: dict = {"attack": name}
    began = time.monotonic()
    if market is None:
        swarm = LocalSwarm(env=node_env(1), start_timeout=300)
    else:
        swarm, path = market.new_swarm(node_env(1)), market.model_path
    try:
        if market is None:
            victim = Account.create()  # a fresh honest client per row: what one row's attack did to it stays there
            extra = private_trust_args(victim.address)
            node = swarm.add_node(
                str(path), blocks=(0, NUM_BLOCKS), name="honest", extra_args=[*args.full_node_args, *extra]
            )
            swarm.wait_for_blocks(str(path), NUM_BLOCKS, timeout=120)
        else:
            node = market.add_honest_node(args.full_node_args)
            victim = market.funded_client().account  # fresh too, with escrow and a reserve for this node
        row["setup_s"] = time.monotonic() - began
        peer_id, direct, node_eth = discover(swarm, path, node)
        sampler = RssSampler(node.process.pid)
        sampler.start()
        runner = None
        if name == "ledger":
            from market import LedgerAttack

            runner = LedgerAttack(market, node_eth or node.eth_address)
            runner.start()
            time.sleep(args.settle)
        elif name != "baseline":
            target = Target(
                initial_peers=swarm.initial_peers,
                model_id=model_id_of(str(path)),
                num_blocks=NUM_BLOCKS,
                hidden_size=64,
                node_peer_id=peer_id,
                node_direct=direct,
                victim_address=victim.address,
                node_eth=node_eth,
                source_host=args.attacker_host,
            )
            options = {"oversize": {"megabytes": args.frame_mb}, "flood": {"connections": args.flood}}.get(name, {})
            runner = AttackRunner(ATTACKS[name], target, **options)
            runner.start()
            time.sleep(args.settle)
        ledger_url = market.url if market is not None else ""
        client = HonestClient(path, swarm.initial_peers, victim.key.hex(), args.tokens, ledger_url=ledger_url)
        generations = client.run(args.generations, args.gen_timeout)
        row["attacker"] = runner.report() if name == "ledger" else runner.stop() if runner is not None else {}
        rss_after = sampler.stop()
        row["node_alive"] = node.alive()
        row["node_rss_mib"] = {"start": sampler.start_mib, "peak": sampler.peak_mib, "after_attack": rss_after}
        row["node_fds"] = {"start": sampler.start_fds, "peak": sampler.peak_fds}
    finally:
        if market is None:
            swarm.close()
        else:
            market.end_row()
    row["generations"] = generations
    row["outcome"] = row["attacker"].get("outcome", "-") if runner is not None else "-"
    row["row_s"] = time.monotonic() - began
    return row


def summarize(row: dict) -> dict:
    runs = row.get("generations", [])
    good = [g["s"] for g in runs if g.get("ok")]
    ordered = sorted(good)
    summary = {
        "success": f"{len(good)}/{len(runs)}" if runs else "-",
        "success_rate": len(good) / len(runs) if runs else None,
        "median_s": statistics.median(ordered) if ordered else None,
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else None,
    }
    errors = [g.get("error", "") for g in runs if not g.get("ok")]
    if errors:
        summary["first_error"] = errors[0][:200]
    return summary


def fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def attacker_line(stats: dict) -> str:
    keep = {k: v for k, v in stats.items() if k not in ("outcome", "errors") and not k.startswith("last_")}
    return ", ".join(f"{k} {v}" for k, v in keep.items())


def table(rows: list[dict]) -> str:
    lines = [
        "| attack | honest success | median s | p95 s | node RSS start/peak/after MiB | node fds peak | attack outcome "
        "| attacker got |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        rss = row.get("node_rss_mib")
        rss_text = f"{rss['start']:.0f} / {rss['peak']:.0f} / {rss['after_attack']:.0f}" if rss else "-"
        fds = row.get("node_fds", {}).get("peak", "-")
        outcome = " ".join(str(row.get("outcome", "-")).split())[:110].replace("|", "/")
        lines.append(
            f"| {row['attack']} | {s['success']} | {fmt(s['median_s'])} | {fmt(s['p95_s'])} | {rss_text} | {fds} | "
            f"{outcome} | {attacker_line(row.get('attacker', {}))[:220]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=ROWS, choices=ROWS, help="rows to run (baseline = no attack)")
    parser.add_argument("--generations", type=int, default=3, help="honest generations per row")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--gen-timeout", type=float, default=30.0, help="s after which a generation counts as failed")
    parser.add_argument("--settle", type=float, default=4.0, help="s an attack runs before the honest client starts")
    parser.add_argument("--frame-mb", type=int, default=128, help="MiB the oversize attack streams on each lane")
    parser.add_argument("--flood", type=int, default=2000, help="connections the flood attack holds")
    parser.add_argument(
        "--attacker-host",
        default="127.0.0.2",
        help="loopback address the attacker's TCP connections come from (the honest client's is 127.0.0.1: another "
        "address stands for another host; pass 127.0.0.1 for an attacker behind the victim's address, '' for any)",
    )
    parser.add_argument("--node-args", type=lambda text: text.split(), default=[], help="extra node arguments")
    parser.add_argument(
        "--private",
        action="store_true",
        help="no chain or ledger: the node trusts the honest client's vouchers (--trusted-clients; --trust-vouchers on "
        "code before issue 22's fixes)",
    )
    parser.add_argument(
        "--json", type=lambda value: results_path(value, "attacks"), default=None, help="write figures here"
    )
    parser.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--peers", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--ledger-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_worker:
        client_worker(args)
        return

    import logging

    logging.basicConfig(level=logging.WARNING)
    began = time.monotonic()
    market = None
    if args.private:
        path = tiny_checkpoint()
        args.full_node_args = node_args(args.node_args)
    else:
        import tempfile

        from market import Market

        path = None
        args.full_node_args = market_node_args(args.node_args)
        home = Path(tempfile.mkdtemp(prefix="attack-market-", dir=bench_dir()))
        log(f"market: Anvil + contracts + ledger in {home}")
        market = Market(home)
        args.market_setup_s = time.monotonic() - began
        log(f"  market up in {args.market_setup_s:.0f}s (ledger {market.url})")
    rows = []
    try:
        for name in args.attacks:
            log(f"row {name}")
            try:
                row = run_row(name, args, path, market)
            except Exception as e:  # a row that could not even start its swarm: say so, go on
                row = {"attack": name, "outcome": f"row failed: {type(e).__name__}: {e}"[:300], "generations": []}
            row["summary"] = summarize(row)
            log(f"  {name}: {row['summary']} outcome {row.get('outcome')} attacker {row.get('attacker')}")
            rows.append(row)
    finally:
        if market is not None:
            market.stop()
    mode = (
        "private swarm (trusted honest client, no ledger)" if args.private else "market (Anvil + ledger, escrow-backed)"
    )
    args.mode = mode
    title = f"Honest generation under attack, tiny Llama, {args.generations} x {args.tokens} tokens per row, {mode}"
    print(f"\n== {title}\n   machine: {machine_line()} | commit {git_commit()} | {time.monotonic() - began:.0f}s\n")
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        skip = ("json", "client_worker", "path", "peers", "key", "ledger_url")
        settings = {k: v for k, v in vars(args).items() if k not in skip}
        figures = {"settings": {**settings, "node_args": args.full_node_args}, "rows": rows}
        args.json.write_text(
            json.dumps(
                {"title": title, "machine": machine_line(), "commit": git_commit(), "figures": figures}, indent=2
            )
        )
        command = "python benchmarks/attacks/bench_swarm_attacks.py " + " ".join(sys.argv[1:])
        markdown = (
            f"## {title}\n\n`{command}`\n\n{machine_line()} | "
            f"commit {git_commit()} | {time.monotonic() - began:.0f}s\n\n{table(rows)}\n"
        )
        args.json.with_suffix(".md").write_text(markdown)


if __name__ == "__main__":
    main()
