"""The ``nectar`` command: a thin dispatcher; each subcommand lives with the package it drives.

It reads the runtime settings (``nectar.settings``) once, before the subcommand runs, so a bad ``NECTAR_*`` value is
reported up front. ``nectar ledger serve|worker`` and ``nectar api serve|worker`` are groups; ``nectar ledger``,
``nectar api`` (= serve) and ``nectar worker`` (= ledger worker) are the older spellings, kept.
"""

import faulthandler
import importlib
import os
import sys

# name -> (module, function, one-line help). Modules are imported lazily so `nectar --help` stays fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("nectar.demo", "main", "run the whole market locally on embedded defaults"),
    "models": ("nectar.models.cli", "main", "list available models (and convert the built-in one)"),
    "dht": ("nectar.node.cli", "dht_main", "start a bootstrap DHT peer"),
    "node": ("nectar.node.cli", "node_main", "host a span of transformer blocks"),
    "swarm": ("nectar.client.cli", "swarm_main", "show who hosts which blocks"),
    "generate": ("nectar.client.cli", "generate_main", "generate text through the swarm"),
    "chat": ("nectar.client.cli", "chat_main", "chat interactively through the swarm"),
    "devnet": ("nectar.chain.cli", "devnet_main", "start Anvil, deploy the contracts, fund demo accounts"),
    "operator": ("nectar.operator", "main", "register|stake|unbond|withdraw|status: a node's stake on chain"),
    "escrow": ("nectar.chain.cli", "escrow_main", "a client's escrow: deposit, reserve for a node, release"),
    "ledger serve": ("nectar.ledger.cli", "serve_main", "run the ledger's HTTP service"),
    "ledger worker": ("nectar.ledger.cli", "worker_main", "run the ledger's Celery worker (with beat)"),
    "api serve": ("nectar.api.cli", "serve_main", "run the paid OpenAI-compatible API"),
    "api worker": ("nectar.api.cli", "worker_main", "run the API's fine-tuning worker"),
}
GROUP_DEFAULTS = {"ledger": "serve", "api": "serve"}  # `nectar ledger --port 1` = `nectar ledger serve --port 1`
ALIASES = {"worker": "ledger worker"}  # the spelling from before the groups


def print_help() -> None:
    print("usage: nectar <command> [options]\n\ncommands:")
    for name, (_, _, help_text) in COMMANDS.items():
        print(f"  {name:<14} {help_text}")
    print("\n`nectar ledger` and `nectar api` alone mean `... serve`; `nectar worker` means `nectar ledger worker`.")
    print("Run `nectar <command> --help` for the options of one command; docs/configuration.md lists every setting.")


def resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    """(command name in COMMANDS, its arguments) for a command line, or None if unknown."""
    name, rest = argv[0], argv[1:]
    if name in ALIASES:
        return ALIASES[name], rest
    if name in GROUP_DEFAULTS:
        if rest and f"{name} {rest[0]}" in COMMANDS:
            return f"{name} {rest[0]}", rest[1:]
        return f"{name} {GROUP_DEFAULTS[name]}", rest
    return (name, rest) if name in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    # a crash in native code (SIGSEGV, SIGABRT) prints every thread's Python stack to stderr, which services log: CI
    # saw `nectar api` end with -11 and nothing else
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr is no file (captured or embedded): nothing to write to
        pass
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return 0
    found = resolve(argv)
    if found is None:
        known = sorted({name.split()[0] for name in COMMANDS} | set(ALIASES))
        print(f"nectar: unknown command {argv[0]!r}. Known: {', '.join(known)}", file=sys.stderr)
        return 2
    name, rest = found
    from nectar.settings import RuntimeSettings, SettingsError, configured

    try:
        settings = RuntimeSettings.from_env(os.environ)  # the one read of NECTAR_* for this command
    except SettingsError as error:
        print(f"nectar {name}: {error}", file=sys.stderr)
        return 2
    if settings.swarm is not None:  # a bad swarm file is reported up front too
        from nectar.cli_kit import read_swarm_file

        try:
            read_swarm_file(settings.swarm)
        except ValueError as error:
            print(f"nectar {name}: NECTAR_SWARM: {error}", file=sys.stderr)
            return 2
    module_name, function_name, _ = COMMANDS[name]
    with configured(settings):
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
