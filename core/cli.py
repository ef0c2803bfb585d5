"""The ``nectar`` command: a thin dispatcher; each subcommand lives with the package it drives."""
import importlib
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
    "ledger": ("nectar.ledger.cli", "ledger_main", "run the ledger service"),
    "worker": ("nectar.ledger.cli", "worker_main", "run the ledger's Celery worker (with beat)"),
    "api": ("nectar.api.cli", "api_main", "run the paid OpenAI-compatible API"),
}


def print_help() -> None:
    print("usage: nectar <command> [options]\n\ncommands:")
    for name, (_, _, help_text) in COMMANDS.items():
        print(f"  {name:<10} {help_text}")
    print("\nRun `nectar <command> --help` for the options of one command.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nectar: unknown command {name!r}. Known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
