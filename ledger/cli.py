"""``nectar ledger serve`` (the HTTP service) and ``nectar ledger worker`` (Celery worker with beat embedded).

``nectar ledger`` and ``nectar worker`` are the same commands' older spellings. Options are fields of the ledger's
``Settings``: a flag given wins over its ``NECTAR_LEDGER_*`` variable, which wins over the ``.env`` file and the
default; the command builds one ``Settings`` and hands it to the service or worker it starts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nectar.cli_kit import add_logging_options, add_options, config_values, setup_logging

logger = logging.getLogger(__name__)

COMMON = ("database_url", "broker_url", "deployment_path")
SERVE = ("host", "port")
WORKER = ("swarm_initial_peers",)
OPTIONS = {  # Settings fields whose flag or help differ from what the field gives
    "database_url": dict(help="SQLAlchemy URL (default: SQLite under NECTAR_HOME)"),
    "broker_url": dict(help="Celery broker (default: SQLite under NECTAR_HOME; redis://... in prod)"),
    "deployment_path": dict(flags=["--deployment"], help="deployment file written by `nectar devnet`"),
    "host": dict(help="address to listen on"),
    "port": dict(help="TCP port"),
    "swarm_initial_peers": dict(
        flags=["--initial-peers"],
        nargs="*",
        metavar="MULTIADDR",
        help="swarm peers for spot checks over the swarm (NECTAR_LEDGER_AUDIT_SOURCE=swarm)",
    ),
}


def _parser(prog: str, description: str, fields: tuple[str, ...]) -> argparse.ArgumentParser:
    from nectar.ledger.core.config import Settings

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, Settings, COMMON + fields, overrides=OPTIONS)
    add_logging_options(parser, default="INFO")
    return parser


def _settings(args: argparse.Namespace, fields: tuple[str, ...], prog: str):
    """The ledger Settings: flags given, then NECTAR_LEDGER_* / .env, then defaults; None (reported) if invalid."""
    from nectar.ledger.core.config import Settings

    values = config_values(args, COMMON + fields, given_only=True)
    peers = values.pop("swarm_initial_peers", None)
    if peers:  # `--initial-peers` with no address leaves the variable in charge
        values["swarm_initial_peers"] = " ".join(peers)
    try:
        return Settings(**values)
    except ValueError as e:
        print(f"{prog}: bad settings: {e}", file=sys.stderr)
        return None


def serve_parser() -> argparse.ArgumentParser:
    return _parser("nectar ledger serve", "Run the ledger's HTTP service (`nectar ledger worker`: its worker).", SERVE)


def worker_parser() -> argparse.ArgumentParser:
    parser = _parser("nectar ledger worker", "Run the ledger's Celery worker with beat.", WORKER)
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--no-beat", action="store_true", help="do not embed beat (when another process runs it)")
    return parser


def serve_main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    level = setup_logging(args)
    settings = _settings(args, SERVE, "nectar ledger")
    if settings is None:
        return 2
    import uvicorn

    from nectar.ledger.service import create_app

    app = create_app(settings)
    logger.info(f"Ledger on http://{settings.host}:{settings.port} (database {settings.database_url.split('@')[-1]})")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=level.lower())
    return 0


def worker_main(argv: list[str]) -> int:
    args = worker_parser().parse_args(argv)
    level = setup_logging(args)
    settings = _settings(args, WORKER, "nectar worker")
    if settings is None:
        return 2
    from nectar.ledger.migrations import run_migrations
    from nectar.ledger.worker import create_celery

    if settings.audit_source == "swarm" or settings.spot_check_verifier == "swarm":
        from nectar.ledger.swarm_audit import initial_peers_of

        if not initial_peers_of(settings):
            print(
                "nectar worker: spot checks over the swarm need its address: pass --initial-peers MULTIADDR "
                "(or set NECTAR_LEDGER_SWARM_INITIAL_PEERS)",
                file=sys.stderr,
            )
            return 2
    run_migrations(settings.database_url)
    app = create_celery(settings)  # the tasks read these settings from the app (nectar.ledger.tasks._settings)
    worker_argv = [
        "worker",
        f"--concurrency={args.concurrency}",
        f"--loglevel={level}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
    ]
    if not args.no_beat:
        worker_argv.append("--beat")
    app.worker_main(worker_argv)
    return 0
