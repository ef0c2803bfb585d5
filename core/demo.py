"""``nectar demo``: the whole market on one machine, on embedded defaults, nothing installed by hand.

A devnet (Anvil + contracts), the ledger service and its Celery worker (SQLite database and broker), a swarm of two
nodes splitting the built-in model, the paid OpenAI-compatible API, and a client that deposits credits, generates text
and pays with vouchers. Then an epoch closes and settles on chain, and the demo prints what each party paid and
earned, and a request to the API that a user can copy (``--keep-running`` leaves everything up for it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nectar.cli_kit import add_logging_options, interrupt_on_sigterm, setup_logging
from nectar.settings import configure

logger = logging.getLogger(__name__)

PRICE_PER_TOKEN = 10**12  # credit wei per token per block: a 30-block model costs 3e13 wei = 30 micro-credits a token
# at the nodes; the API charges what its requests' receipts add up to, plus its margin (docs/economics.md)
DEPOSIT = 10 * 10**18
RESERVE = 10**18  # per node: what a node serves the client against without trusting it (nodes check it, issue 20)


def _reserve_for(chain, private_key: str, nodes) -> None:
    """Backs the payer's vouchers to each node with a reserve only that node can draw on (``nectar escrow reserve``):
    nodes with a ledger count vouchers as paid only as far as the chain backs them."""
    from eth_account import Account

    payer = Account.from_key(private_key).address
    for node in nodes:
        held = chain.reserve_of(payer, node.eth_address)
        if held["amount"] - held["pendingRelease"] < RESERVE:
            chain.reserve(private_key, node.eth_address, RESERVE)


def _wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _spawn(args: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nectar.cli", *args],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _credits(wei: int) -> str:
    return f"{wei / 10**18:.8f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="Explain in one sentence why the sky is blue.")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--workdir", default=None, help="logs, keys, database (default: a temp dir)")
    parser.add_argument("--keep-running", action="store_true", help="leave the market up until Ctrl-C")
    add_logging_options(parser, default="WARNING")
    args = parser.parse_args(argv)
    setup_logging(args)
    interrupt_on_sigterm()  # SIGTERM stops every child as Ctrl-C does (the finally below)

    from nectar.api.launch import ApiProcess, api_environment, demo_account, example_request
    from nectar.chain import Chain, free_port, start_devnet
    from nectar.client import ClientConfig, DistributedModelForCausalLM
    from nectar.models import get_family, load_config, load_tokenizer, model_id_of, resolve_model
    from nectar.node.local_swarm import LocalSwarm
    from nectar.operator import ensure_registered
    from nectar.paths import nectar_home
    from nectar.wire.ledger_api import LedgerClient

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nectar-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] working in {workdir} (logs of every process are here)")
    model_path = resolve_model(args.model)  # converts the built-in model once, with a progress bar
    config = load_config(model_path)
    num_blocks = get_family(config).num_blocks(config)

    print("[demo] starting the devnet: Anvil + contracts ...", flush=True)
    devnet = start_devnet(port=free_port(), state_dir=workdir / "devnet")
    processes = []
    swarm = api = model = None
    try:
        deployment_path = workdir / "devnet" / "deployment.json"
        chain = Chain.from_deployment(deployment_path)
        deployment = json.loads(deployment_path.read_text())
        accounts = {}
        for account in deployment["accounts"]:
            accounts.setdefault(account["role"], []).append(account)
        env = {
            **os.environ,
            "NECTAR_DEPLOYMENT": str(deployment_path),
            "NECTAR_LEDGER_DATABASE_URL": f"sqlite:///{workdir / 'ledger.db'}",
            "NECTAR_LEDGER_BROKER_URL": f"sqla+sqlite:///{workdir / 'broker.db'}",
            # the demo closes its epoch by hand; beat's epoch only has to stay under the unlock delay (3600 s), which
            # the ledger checks: 2 epochs + the lease must settle before a client could withdraw (issue 20)
            "NECTAR_LEDGER_EPOCH_SECONDS": "1500",
        }  # for the child processes
        configure(deployment=deployment_path)  # this process's client signs vouchers under the devnet's EIP-712 domain
        ledger_port = free_port()
        ledger_url = f"http://127.0.0.1:{ledger_port}"
        print("[demo] starting the ledger service and its Celery worker (SQLite) ...", flush=True)
        processes.append(_spawn(["ledger", "serve", "--port", str(ledger_port)], workdir / "ledger.log", env))
        _wait_http(f"{ledger_url}/health")  # the ledger migrates the database first, then the worker may start
        processes.append(_spawn(["ledger", "worker"], workdir / "worker.log", env))

        print(
            f"[demo] starting a swarm: a bootstrap peer and 2 nodes serving {num_blocks} blocks of {args.model} ...",
            flush=True,
        )
        swarm = LocalSwarm(workdir=workdir / "swarm", env=env)
        half = num_blocks // 2
        for index, (name, blocks) in enumerate([("node-a", (0, half)), ("node-b", (half, num_blocks))]):
            key_dir = workdir / "swarm" / "keys" / name
            key_dir.mkdir(parents=True, exist_ok=True)
            node_account = accounts["node"][index]
            (key_dir / "eth.json").write_text(
                json.dumps({"address": node_account["address"], "private_key": node_account["privateKey"]})
            )
            ensure_registered(chain, key_dir)  # only staked nodes earn: `nectar operator register` (issue 20)
            swarm.add_node(
                args.model,
                blocks=blocks,
                name=name,
                extra_args=["--price", str(PRICE_PER_TOKEN), "--ledger-url", ledger_url],
            )
        swarm.wait_for_blocks(args.model, num_blocks)
        for node in swarm.nodes:
            print(f"         {node.name} {node.address}")

        print("[demo] starting the paid OpenAI-compatible API and its fine-tuning worker ...", flush=True)
        gateway_key = accounts["client"][1]["privateKey"]  # the gateway pays nodes from its own escrow
        if chain.escrow_balance(accounts["client"][1]["address"]) < DEPOSIT:
            chain.deposit(gateway_key, DEPOSIT)
        _reserve_for(chain, gateway_key, swarm.nodes)
        api = ApiProcess(
            env=api_environment(
                home=nectar_home(),
                model=args.model,
                initial_peers=swarm.initial_peers,
                ledger_url=ledger_url,
                deployment_path=deployment_path,
                private_key=gateway_key,
                database_url=f"sqlite:///{workdir / 'api.db'}",
                broker_url=f"sqla+sqlite:///{workdir / 'api-broker.db'}",
            ),
            log_dir=workdir,
            worker=True,
        )
        api_account = demo_account(api.url, credits="10")

        client = accounts["client"][0]
        escrow_before = chain.escrow_balance(client["address"])
        if escrow_before < DEPOSIT:
            chain.deposit(client["privateKey"], DEPOSIT - escrow_before)
        _reserve_for(chain, client["privateKey"], swarm.nodes)
        escrow_before = chain.escrow_balance(client["address"])
        node_before = {n.eth_address: chain.node_balance(n.eth_address) for n in swarm.nodes}
        print(f"[demo] client {client['address']} has {_credits(escrow_before)} credits in escrow")

        tokenizer = load_tokenizer(model_path)
        model = DistributedModelForCausalLM.from_pretrained(
            args.model,
            initial_peers=swarm.initial_peers,
            private_key=client["privateKey"],
            config=ClientConfig(ledger_url=ledger_url),  # pays through the ledger: routes only to staked nodes
        )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        print(f"[demo] user: {args.prompt}\n[demo] assistant: ", end="", flush=True)
        began, generated, printed = time.perf_counter(), [], ""
        for token in model.stream_generate(
            input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, tokenizer=tokenizer
        ):
            generated.append(int(token[0]))
            now = tokenizer.decode(generated, skip_special_tokens=True)
            print(now[len(printed) :], end="", flush=True)
            printed = now
        elapsed = time.perf_counter() - began
        charged = model.wallet.total_paid
        print(
            f"\n[demo] {len(generated)} tokens in {elapsed:.1f}s through {len(swarm.nodes)} nodes; "
            f"{len(model.wallet.receipts)} receipts checked; client owes {_credits(charged)} credits"
        )
        model.shutdown()
        model = None

        print("[demo] closing the epoch: Merkle root on chain, vouchers settled in one batch ...", flush=True)
        ledger = LedgerClient(ledger_url, admin_token=deployment.get("admin_token") or _admin_token())
        _wait_for_vouchers(ledger, charged, swarm)
        ledger.close_epoch()
        epoch = _wait_for_settlement(ledger)
        escrow_after = chain.escrow_balance(client["address"])
        node_after = {a: chain.node_balance(a) for a in node_before}
        earned = {a: node_after[a] - node_before[a] for a in node_before}
        fee = (escrow_before - escrow_after) - sum(earned.values())
        print(f"[demo] epoch {epoch['number']} settled: {epoch['receipt_count']} receipts, root {epoch['root']}")
        print(
            f"         client escrow: {_credits(escrow_before)} -> {_credits(escrow_after)} "
            f"(paid {_credits(escrow_before - escrow_after)})"
        )
        for node in swarm.nodes:
            print(f"         {node.name} ({node.eth_address}) earned {_credits(earned[node.eth_address])} on chain")
        print(f"         protocol fee: {_credits(fee)}")
        ok = escrow_before - escrow_after == charged
        print(
            f"[demo] {'OK' if ok else 'MISMATCH'}: the client was charged exactly what its receipts add up to"
            if ok
            else f"[demo] MISMATCH: charged {charged}, escrow fell by {escrow_before - escrow_after}"
        )
        import httpx

        reply = httpx.post(
            f"{api.url}/v1/chat/completions",
            timeout=120,
            headers={"Authorization": f"Bearer {api_account['api_key']}"},
            json={
                "model": model_id_of(args.model),
                "max_tokens": 16,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        ).json()
        print(
            f"[demo] the paid API answered: {reply['choices'][0]['message']['content']!r} "
            f"(usage {reply['usage']['total_tokens']} tokens, {reply['usage']['cost']} credits debited from the API "
            "account: what the nodes' receipts charged + the gateway's margin)"
        )
        from nectar.api.core.config import DEVNET_ADMIN_TOKEN

        # the monitor's market series and the node endpoints are the operator's: the admin token, or a node's key
        print(
            f"[demo] swarm monitor: {api.url}/monitor#admin={DEVNET_ADMIN_TOKEN}; a node's own records: nectar "
            f"operator records --key-dir {swarm.workdir / 'keys' / swarm.nodes[0].name} --api-url {api.url}"
        )
        print(f"[demo] the paid API is at {api.url}/v1; with --keep-running, try:")
        print(example_request(api.url, api_account["api_key"], model_id_of(args.model)))
        if args.keep_running:
            print(
                f"[demo] market is up: API {api.url}, ledger {ledger_url}, swarm {swarm.initial_peers[0]}, "
                f"chain {chain.w3.provider.endpoint_uri}. Ctrl-C (or SIGTERM) to stop."
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the market below
                print("[demo] stopping every process ...", flush=True)
        return 0 if ok else 1
    finally:
        if model is not None:
            model.shutdown()
        if api is not None:
            api.stop()
        if swarm is not None:
            swarm.close()
        for process in processes:
            _stop(process)
        devnet.stop()


def _admin_token() -> str:
    from nectar.ledger.core.config import get_settings

    return get_settings().admin_token


def _wait_for_vouchers(ledger, charged: int, swarm, timeout: float = 60) -> None:
    """Nodes forward receipts and vouchers in the background: wait until the ledger has all the client paid."""
    from nectar.wire.ledger_api import LedgerError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total = 0
        for node in swarm.nodes:
            try:
                total += int(ledger.node(node.eth_address)["earned"])
            except LedgerError:
                pass  # not seen yet
        if total >= charged:
            time.sleep(2)  # vouchers travel in the same background flush as receipts
            return
        time.sleep(0.5)


def _wait_for_settlement(ledger, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        settled = [e for e in ledger.epochs() if e["status"] == "settled" and e["receipt_count"] > 0]
        if settled:
            return settled[0]
        time.sleep(1)
    raise TimeoutError("the epoch did not settle within the timeout; see worker.log in the demo's workdir")
