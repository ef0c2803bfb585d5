"""``nectar ledger`` (the HTTP service) and ``nectar worker`` (Celery worker with beat embedded)."""
from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite under NECTAR_HOME)")
    parser.add_argument("--broker-url", help="Celery broker (default: SQLite under NECTAR_HOME; redis://... in prod)")
    parser.add_argument("--deployment", help="deployment file written by `nectar devnet`")
    parser.add_argument("--log-level", default="INFO")


def _apply(args) -> None:
    # Settings reads the environment, so flags become variables before the first get_settings() call
    for flag, env in (("database_url", "DATABASE_URL"), ("broker_url", "BROKER_URL"), ("deployment", "DEPLOYMENT_PATH")):
        if getattr(args, flag, None):
            os.environ[f"NECTAR_LEDGER_{env}"] = str(getattr(args, flag))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def ledger_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar ledger", description="Run the ledger's HTTP service.")
    _common(parser)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    _apply(args)
    import uvicorn

    from nectar.ledger.core.config import get_settings
    from nectar.ledger.service import create_app

    try:
        settings = get_settings()
    except ValueError as e:
        print(f"nectar ledger: bad settings: {e}")
        return 2
    app = create_app(settings)
    host, port = args.host or settings.host, args.port or settings.port
    logger.info(f"Ledger on http://{host}:{port} (database {settings.database_url.split('@')[-1]})")
    uvicorn.run(app, host=host, port=port, log_level=args.log_level.lower())
    return 0


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nectar worker", description="Run the ledger's Celery worker with beat.")
    _common(parser)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--no-beat", action="store_true", help="do not embed beat (when another process runs it)")
    parser.add_argument("--initial-peers", nargs="*", metavar="MULTIADDR",
                        help="swarm peers for spot checks over the swarm (NECTAR_LEDGER_AUDIT_SOURCE=swarm)")
    args = parser.parse_args(argv)
    if args.initial_peers:
        os.environ["NECTAR_LEDGER_SWARM_INITIAL_PEERS"] = " ".join(args.initial_peers)
    _apply(args)
    from nectar.ledger.core.config import get_settings
    from nectar.ledger.migrations import run_migrations
    from nectar.ledger.worker import create_celery

    try:
        settings = get_settings()
    except ValueError as e:
        print(f"nectar worker: bad settings: {e}")
        return 2
    if settings.audit_source == "swarm" or settings.spot_check_verifier == "swarm":
        from nectar.ledger.swarm_audit import initial_peers_of

        if not initial_peers_of(settings):
            print("nectar worker: spot checks over the swarm need its address: pass --initial-peers MULTIADDR "
                  "(or set NECTAR_LEDGER_SWARM_INITIAL_PEERS)")
            return 2
    run_migrations(settings.database_url)
    app = create_celery(settings)
    worker_argv = ["worker", f"--concurrency={args.concurrency}", f"--loglevel={args.log_level}", "--pool=prefork",
                   "--without-gossip", "--without-mingle"]  # fmt: skip
    if not args.no_beat:
        worker_argv.append("--beat")
    app.worker_main(worker_argv)
    return 0
