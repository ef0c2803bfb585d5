"""``nectar api serve`` (the HTTP gateway, uvicorn) and ``nectar api worker`` (its Celery worker for fine-tuning jobs).

``nectar api`` is the older spelling of ``nectar api serve``. Options are fields of the API's ``Settings``: a flag
given wins over its ``NECTAR_API_*`` variable, which wins over the ``.env`` file and the default; the command builds
one ``Settings`` and hands it to the app or worker it starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nectar.cli_kit import add_logging_options, add_options, config_values, setup_logging, swarm_file
from nectar.wire.peers import initial_peers

logger = logging.getLogger(__name__)

COMMON = ("models", "initial_peers", "database_url", "broker_url", "deployment_path", "private_key")
SERVE = ("host", "port", "ledger_url", "price_margin", "max_route_price", "price_per_token")
OPTIONS = {  # Settings fields whose flag, shape or help differ from what the field gives
    "models": dict(help="built-in names, checkpoint folders or Hub ids (org/name[@revision]) to serve"),
    "initial_peers": dict(metavar="MULTIADDR", help="swarm peers (default: NECTAR_INITIAL_PEERS)"),
    "database_url": dict(help="SQLAlchemy URL (default: SQLite under NECTAR_HOME)"),
    "broker_url": dict(help="Celery broker (default: SQLite under NECTAR_HOME; redis://... in prod)"),
    "deployment_path": dict(flags=["--deployment"], help="deployment file written by `nectar devnet`"),
    "private_key": dict(help="the gateway's wallet key (default on a devnet: a demo client)"),
    "host": dict(help="address to listen on"),
    "port": dict(help="TCP port"),
    "ledger_url": dict(help="the ledger service, for node receipts, earnings and reputation"),
    "price_per_token": dict(help="micro-credits charged per token at least (a floor under the route's price)"),
    "price_margin": dict(help="share charged on top of what the route's nodes charge (0.2 = 20%%)"),
    "max_route_price": dict(help="credit wei per token through every block: dearer routes are not taken"),
}


def _parser(prog: str, description: str, fields: tuple[str, ...]) -> argparse.ArgumentParser:
    from nectar.api.core.config import Settings

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, Settings, COMMON + fields, overrides=OPTIONS)
    add_logging_options(parser, default="INFO")
    return parser


def _settings(args: argparse.Namespace, fields: tuple[str, ...], prog: str):
    """The API Settings (flags given, then NECTAR_API_* / .env, then defaults), or None (reported) if invalid. The
    gateway's wallet signs vouchers under the EIP-712 domain of the runtime settings' deployment file: it is pointed at
    the file these settings name, so gateway, nodes and chain share one domain."""
    from nectar.api.core.config import Settings
    from nectar.settings import configure

    try:
        settings = Settings(**config_values(args, COMMON + fields, given_only=True))
    except ValueError as e:
        print(f"{prog}: bad settings: {e}", file=sys.stderr)
        return None
    configure(deployment=settings.deployment_path)
    return settings


def serve_parser() -> argparse.ArgumentParser:
    return _parser(
        "nectar api serve",
        "Run the paid OpenAI-compatible API gateway. `nectar api worker` runs its fine-tuning worker.",
        SERVE,
    )


def worker_parser() -> argparse.ArgumentParser:
    parser = _parser("nectar api worker", "Run the API's Celery worker (fine-tuning jobs), on queue nectar-api.", ())
    parser.add_argument("--concurrency", type=int, default=1, help="jobs trained at once (threads; default: 1)")
    return parser


def serve_main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    level = setup_logging(args)
    settings = _settings(args, SERVE, "nectar api")
    if settings is None:
        return 2
    try:
        peers = initial_peers(settings.initial_peers, env=os.environ, swarm=swarm_file(env=os.environ))
    except ValueError as e:  # a bad address, or a bad NECTAR_SWARM file
        print(f"nectar api: {e}", file=sys.stderr)
        return 2
    if not peers:
        print(
            "nectar api: no swarm to serve from: pass --initial-peers MULTIADDR (printed by `nectar dht` or "
            "`nectar node`), or set NECTAR_INITIAL_PEERS or NECTAR_SWARM (a swarm file)",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from nectar.api.main import create_app

    app = create_app(settings)
    print(
        f"Nectar API on {settings.base_url}/v1 (monitor: {settings.base_url}/monitor, docs: {settings.base_url}/docs)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=level.lower(), timeout_graceful_shutdown=10)
    except ValueError as e:  # no peers, unknown model: say what to do instead of a traceback
        print(f"nectar api: {e}", file=sys.stderr)
        return 2
    return 0


def worker_main(argv: list[str]) -> int:
    args = worker_parser().parse_args(argv)
    level = setup_logging(args)
    settings = _settings(args, (), "nectar api worker")
    if settings is None:
        return 2
    from nectar.api.migrations import run_migrations
    from nectar.api.worker import QUEUE, create_celery

    run_migrations(settings.database_url)
    app = create_celery(settings)  # the tasks read these settings from the app (nectar.api.tasks._settings)
    app.worker_main(
        [
            "worker",
            f"--concurrency={args.concurrency}",
            f"--loglevel={level}",
            "--pool=threads",
            f"--queues={QUEUE}",
            "--without-gossip",
            "--without-mingle",
            "--hostname=nectar-api@%h",
        ]
    )
    return 0
