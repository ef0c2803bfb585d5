"""The `nectar` command: symmetric groups with the old spellings kept, options built from the config objects (so the
command line's defaults are the objects' own), flags reaching the ledger and API as Settings, one logging setup."""

from __future__ import annotations

import dataclasses
import os

import pytest

from nectar import settings
from nectar.cli import main as nectar_main
from nectar.cli import resolve
from nectar.cli_kit import log_level_of


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["ledger", "serve"], "nectar ledger serve"),
        (["ledger"], "nectar ledger serve"),  # the spelling from before the groups
        (["ledger", "worker"], "nectar ledger worker"),
        (["worker"], "nectar ledger worker"),  # likewise
        (["api", "serve"], "nectar api serve"),
        (["api"], "nectar api serve"),
        (["api", "worker"], "nectar api worker"),
        (["node"], "nectar node"),
        (["dht"], "nectar dht"),
        (["generate"], "nectar generate"),
        (["chat"], "nectar chat"),
        (["swarm"], "nectar swarm"),
        (["devnet"], "nectar devnet"),
        (["models"], "nectar models"),
        (["demo"], "nectar demo"),
    ],
)
def test_every_command_and_old_spelling_answers_help(argv, prog, capsys):
    with pytest.raises(SystemExit) as caught:
        nectar_main([*argv, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ") and "--log-level" in out


def test_groups_route_their_arguments():
    assert resolve(["ledger", "--port", "1"]) == ("ledger serve", ["--port", "1"])
    assert resolve(["ledger", "worker", "--no-beat"]) == ("ledger worker", ["--no-beat"])
    assert resolve(["worker", "--no-beat"]) == ("ledger worker", ["--no-beat"])
    assert resolve(["api", "worker"]) == ("api worker", [])
    assert resolve(["api", "--initial-peers", "x"]) == ("api serve", ["--initial-peers", "x"])
    assert resolve(["teleport"]) is None


def test_an_unknown_command_lists_the_known_ones(capsys):
    assert nectar_main(["teleport"]) == 2
    assert "ledger" in capsys.readouterr().err


def test_the_node_command_line_defaults_are_nodeconfig_defaults(monkeypatch):
    from nectar.node.cli import node_config, node_parser
    from nectar.node.config import NodeConfig

    monkeypatch.delenv("NECTAR_INITIAL_PEERS", raising=False)
    built = node_config(node_parser().parse_args([]))
    assert dataclasses.replace(built, initial_peers=tuple(built.initial_peers)) == NodeConfig()
    flagged = node_config(
        node_parser().parse_args(
            [
                "--price",
                "7",
                "--name",
                "n1",
                "--blocks",
                "2:5",
                "--cache-mb",
                "1.5",
                "--dtype",
                "bfloat16",
                "--batch-wait",
                "0.5",
                "--initial-peers",
                "/ip4/127.0.0.1/tcp/1",
                "/ip4/127.0.0.2/tcp/2",
            ]
        )
    )
    assert (flagged.price_per_token, flagged.public_name, flagged.blocks) == (7, "n1", (2, 5))
    assert flagged.cache_memory_bytes == int(1.5 * 2**20) and flagged.dtype == "bfloat16" and flagged.batch_wait == 0.5
    assert list(flagged.initial_peers) == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.2/tcp/2"]


def test_the_client_command_line_defaults_are_clientconfig_defaults():
    from nectar.client.cli import client_config, generate_parser
    from nectar.client.config import ClientConfig

    assert client_config(generate_parser().parse_args(["hi"])) == ClientConfig()
    assert generate_parser().parse_args(["hi", "--initial-peers", "/ip4/1/p2p/A"]).initial_peers == ["/ip4/1/p2p/A"]
    flagged = client_config(
        generate_parser().parse_args(["hi", "--no-direct", "--push", "--step-timeout", "5", "--ledger-url", "http://l"])
    )
    assert (flagged.direct, flagged.push, flagged.step_timeout, flagged.ledger_url) == (False, True, 5.0, "http://l")


def test_ledger_flags_win_over_variables_and_reach_settings_without_touching_the_environment(monkeypatch, tmp_path):
    from nectar.ledger.cli import SERVE, WORKER, _settings, serve_parser, worker_parser
    from nectar.ledger.core.config import Settings

    monkeypatch.setenv("NECTAR_HOME", str(tmp_path))
    monkeypatch.setenv("NECTAR_LEDGER_PORT", "8123")
    before = dict(os.environ)
    plain = _settings(serve_parser().parse_args([]), SERVE, "test")
    assert plain == Settings() and plain.port == 8123  # no flag: the variable, then the default
    flagged = _settings(
        serve_parser().parse_args(
            ["--port", "9001", "--database-url", "sqlite:///x.db", "--deployment", str(tmp_path / "d.json")]
        ),
        SERVE,
        "test",
    )
    assert (flagged.port, flagged.database_url, flagged.deployment_path) == (
        9001,
        "sqlite:///x.db",
        tmp_path / "d.json",
    )
    worker = _settings(worker_parser().parse_args(["--initial-peers", "/ip4/1", "/ip4/2"]), WORKER, "test")
    assert worker.swarm_initial_peers == "/ip4/1 /ip4/2"
    assert dict(os.environ) == before


def test_api_flags_reach_settings_and_the_wallets_deployment_without_touching_the_environment(monkeypatch, tmp_path):
    from nectar.api.cli import SERVE, _settings, serve_parser
    from nectar.paths import deployment_path

    monkeypatch.setenv("NECTAR_HOME", str(tmp_path))
    before = dict(os.environ)
    with settings.configured():
        args = serve_parser().parse_args(
            [
                "--models",
                "a",
                "b",
                "--initial-peers",
                "/ip4/1",
                "--price-per-token",
                "3",
                "--deployment",
                str(tmp_path / "d.json"),
            ]
        )
        built = _settings(args, SERVE, "test")
        assert (built.models, built.initial_peers, built.price_per_token) == (["a", "b"], ["/ip4/1"], 3)
        assert deployment_path() == tmp_path / "d.json"  # vouchers are signed under the domain of this file
    assert dict(os.environ) == before
    monkeypatch.setenv("NECTAR_API_ENVIRONMENT", "production")
    assert _settings(serve_parser().parse_args([]), SERVE, "test") is None  # reported, not raised


def test_celery_tasks_read_the_settings_their_worker_was_built_with(tmp_path):
    from celery import current_app

    from nectar.ledger import tasks
    from nectar.ledger.core.config import Settings
    from nectar.ledger.worker import create_celery

    previous = current_app._get_current_object()
    built = Settings(database_url=f"sqlite:///{tmp_path / 'flag.db'}", broker_url="memory://")
    app = create_celery(built)
    try:
        app.set_current()
        assert tasks._settings() is built
    finally:
        previous.set_current()


def test_the_log_level_comes_from_the_flag_then_verbose_then_the_variable_then_the_command(monkeypatch):
    from nectar.node.cli import node_parser

    monkeypatch.delenv("NECTAR_LOG_LEVEL", raising=False)
    settings.reset()
    parser = node_parser()
    assert log_level_of(parser.parse_args([])) == "INFO"
    assert log_level_of(parser.parse_args(["-v"])) == "DEBUG"
    monkeypatch.setenv("NECTAR_LOG_LEVEL", "warning")
    assert log_level_of(parser.parse_args([])) == "WARNING"
    assert log_level_of(parser.parse_args(["-v"])) == "DEBUG"
    assert log_level_of(parser.parse_args(["--log-level", "error", "-v"])) == "ERROR"
    settings.reset()
