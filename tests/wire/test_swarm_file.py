"""Swarm files (``--swarm FILE`` / ``NECTAR_SWARM``): a swarm by name in one flag, its contents checked."""

import json

import pytest

from nectar.cli_kit import read_swarm_file as load_swarm_file
from nectar.cli_kit import swarm_file
from nectar.node.cli import node_config, node_parser
from nectar.wire.peers import SwarmFileError, initial_peers

A = "/ip4/127.0.0.1/tcp/31337/p2p/QmXYeFtVr5oXfPb5mJp5PfHbZfNmnxLJ8Su8SmNT7hjQrs"
B = "/dns4/boot.example.org/tcp/4000/p2p/QmXYeFtVr5oXfPb5mJp5PfHbZfNmnxLJ8Su8SmNT7hjQrs"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, text",
    [
        ("s.toml", f'name = "pub"\ninitial_peers = ["{A}", "{B}"]\nmodel = "tiny"\nledger_url = "https://l.example"\n'),
        (
            "s.json",
            json.dumps({"name": "pub", "initial_peers": [A, B], "model": "tiny", "ledger_url": "https://l.example"}),
        ),
        ("s.yaml", f"name: pub\ninitial_peers:\n  - {A}\n  - {B}\nmodel: tiny\nledger_url: https://l.example\n"),
        ("swarm", f'name = "pub"\ninitial_peers = ["{A}", "{B}"]\nmodel = "tiny"\nledger_url = "https://l.example"\n'),
    ],
)
def test_toml_json_and_yaml_name_the_same_swarm(tmp_path, name, text):
    swarm = load_swarm_file(_write(tmp_path, name, text))
    assert (swarm.name, swarm.initial_peers, swarm.model, swarm.ledger_url) == (
        "pub",
        [A, B],
        "tiny",
        "https://l.example",
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ('name = "pub"\n', "initial_peers must be a list"),
        ('name = "pub"\ninitial_peers = []\n', "1 to 64 peers"),
        ('name = "pub"\ninitial_peers = ["/ip4/1.2.3.4/tcp/1"]\n', "lacks its peer id"),
        ('name = "pub"\ninitial_peers = ["127.0.0.1:31337"]\n', "is not a peer multiaddr"),
        (f'name = "a b"\ninitial_peers = ["{A}"]\n', "name must be"),
        (f'name = "pub"\ninitial_peer = ["{A}"]\n', "unknown key(s) initial_peer"),
        (f'name = "pub"\ninitial_peers = ["{A}"]\nledger_url = "file:///etc/passwd"\n', "ledger_url must be"),
        ("name = [", "not valid TOML"),
        (f'initial_peers = ["{A}"]\n', "name must be"),
    ],
)
def test_a_bad_swarm_file_is_refused_with_what_to_fix(tmp_path, text, problem):
    with pytest.raises(SwarmFileError) as error:
        load_swarm_file(_write(tmp_path, "bad.toml", text))
    assert problem in str(error.value) and "bad.toml" in str(error.value)


def test_missing_and_oversized_files_are_refused(tmp_path):
    with pytest.raises(SwarmFileError, match="cannot be read"):
        load_swarm_file(tmp_path / "nope.toml")
    with pytest.raises(SwarmFileError, match="larger than"):
        load_swarm_file(_write(tmp_path, "big.toml", f'name = "x"\n# {"x" * 70000}\n'))


def test_precedence_flag_then_file_then_environment(tmp_path):
    path = _write(tmp_path, "s.toml", f'name = "pub"\ninitial_peers = ["{B}"]\n')
    env = {"NECTAR_INITIAL_PEERS": A}
    assert initial_peers([A], env={}, swarm=swarm_file(path, env={})) == [A]  # --initial-peers wins
    assert initial_peers(None, env=env, swarm=swarm_file(path, env=env)) == [B]  # then --swarm
    env = {"NECTAR_INITIAL_PEERS": A, "NECTAR_SWARM": str(path)}
    assert initial_peers(None, env=env, swarm=swarm_file(None, env=env)) == [B]  # then NECTAR_SWARM
    assert initial_peers(None, env={"NECTAR_INITIAL_PEERS": A}, swarm=swarm_file(None, env={})) == [A]
    assert swarm_file(None, env={}) is None and initial_peers(None, env={}) == []


def test_a_node_takes_its_peers_model_and_ledger_from_the_swarm_file(tmp_path, monkeypatch):
    path = _write(
        tmp_path, "s.toml", f'name = "pub"\ninitial_peers = ["{A}"]\nmodel = "tiny"\nledger_url = "http://l:1"\n'
    )
    monkeypatch.delenv("NECTAR_INITIAL_PEERS", raising=False)
    config = node_config(node_parser().parse_args(["--swarm", str(path)]))
    assert (list(config.initial_peers), config.model, config.ledger_url) == ([A], "tiny", "http://l:1")
    config = node_config(node_parser().parse_args(["--swarm", str(path), "--model", "other", "--ledger-url", "x"]))
    assert (config.model, config.ledger_url) == ("other", "x")  # flags win
    monkeypatch.setenv("NECTAR_SWARM", str(path))
    assert node_config(node_parser().parse_args([])).model == "tiny"
