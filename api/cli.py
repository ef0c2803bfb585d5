"""``nectar api`` (the HTTP gateway, uvicorn) and ``nectar api worker`` (its Celery worker for fine-tuning jobs)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

# flag -> NECTAR_API_* variable (Settings reads the environment, so flags become variables before it is built)
FLAGS = {
    "models": "MODELS", "initial_peers": "INITIAL_PEERS", "database_url": "DATABASE_URL", "broker_url": "BROKER_URL",
    "deployment": "DEPLOYMENT_PATH", "ledger_url": "LEDGER_URL", "private_key": "PRIVATE_KEY",
    "price_per_token": "PRICE_PER_TOKEN", "host": "HOST", "port": "PORT",
}  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", help="built-in names or checkpoint folders to serve "
                                                    "(default: smollm2-135m)")
    parser.add_argument("--initial-peers", nargs="+", metavar="MULTIADDR",
                        help="swarm peers (default: NECTAR_INITIAL_PEERS)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite under NECTAR_HOME)")
    parser.add_argument("--broker-url", help="Celery broker (default: SQLite under NECTAR_HOME; redis://... in prod)")
    parser.add_argument("--deployment", help="deployment file written by `nectar devnet`")
    parser.add_argument("--private-key", help="the gateway's wallet key (default on a devnet: a demo client)")
    parser.add_argument("--log-level", default="INFO")


def _apply(args) -> None:
    for flag, env in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[f"NECTAR_API_{env}"] = " ".join(value) if isinstance(value, list) else str(value)
    if getattr(args, "deployment", None):
        # the client's wallet signs vouchers under the domain of nectar.paths.deployment_path(): keep them one file
        os.environ["NECTAR_DEPLOYMENT"] = str(args.deployment)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "asyncio", "httpx", "urllib3", "web3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(prog: str):
    from nectar.api.core.config import get_settings

    try:
        return get_settings()
    except ValueError as e:
        print(f"{prog}: bad settings: {e}", file=sys.stderr)
        return None


def api_main(argv: list[str]) -> int:
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(prog="nectar api", description="Run the paid OpenAI-compatible API gateway. "
                                     "`nectar api worker` runs its fine-tuning worker.")  # fmt: skip
    _common(parser)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8800)")
    parser.add_argument("--ledger-url", help="the ledger service, for node receipts, earnings and reputation")
    parser.add_argument("--price-per-token", type=int, help="micro-credits charged per token (default 10)")
    args = parser.parse_args(argv)
    _apply(args)
    settings = _settings("nectar api")
    if settings is None:
        return 2
    if not (settings.initial_peers or os.environ.get("NECTAR_INITIAL_PEERS", "").strip()):
        print("nectar api: no swarm to serve from: pass --initial-peers MULTIADDR (printed by `nectar dht` or "
              "`nectar node`) or set NECTAR_INITIAL_PEERS", file=sys.stderr)
        return 2
    import uvicorn

    from nectar.api.main import create_app

    app = create_app(settings)
    print(f"Nectar API on {settings.base_url}/v1 (monitor: {settings.base_url}/monitor, docs: "
          f"{settings.base_url}/docs)", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower(),
                    timeout_graceful_shutdown=10)  # fmt: skip
    except ValueError as e:  # no peers, unknown model: say what to do instead of a traceback
        print(f"nectar api: {e}", file=sys.stderr)
        return 2
    return 0


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar api worker", description="Run the API's Celery worker "
                                     "(fine-tuning jobs), on queue nectar-api.")  # fmt: skip
    _common(parser)
    parser.add_argument("--concurrency", type=int, default=1, help="jobs trained at once (threads)")
    args = parser.parse_args(argv)
    _apply(args)
    settings = _settings("nectar api worker")
    if settings is None:
        return 2
    from nectar.api.migrations import run_migrations
    from nectar.api.worker import QUEUE, create_celery

    run_migrations(settings.database_url)
    app = create_celery(settings)
    app.worker_main(["worker", f"--concurrency={args.concurrency}", f"--loglevel={args.log_level}", "--pool=threads",
                     f"--queues={QUEUE}", "--without-gossip", "--without-mingle", "--hostname=nectar-api@%h"])
    return 0
