"""The one peer-list rule: multiaddrs separated by commas and/or whitespace, each checked."""

import pytest

from nectar.wire.peers import initial_peers, parse_peers

A = "/ip4/127.0.0.1/tcp/31337/p2p/QmXYeFtVr5oXfPb5mJp5PfHbZfNmnxLJ8Su8SmNT7hjQrs"
B = "/ip4/10.0.0.2/tcp/4000/p2p/QmXYeFtVr5oXfPb5mJp5PfHbZfNmnxLJ8Su8SmNT7hjQrs"


@pytest.mark.parametrize(
    "value", [f"{A},{B}", f"{A} {B}", f"{A}, {B}", f" {A}\n{B} ,", [A, B], [f"{A},{B}"], (A, f" {B} ")]
)
def test_commas_and_whitespace_both_separate(value):
    assert parse_peers(value) == [A, B]


def test_empty_values_give_no_peers():
    assert parse_peers(None) == parse_peers("") == parse_peers(" , ,\n") == parse_peers([]) == []


@pytest.mark.parametrize("bad", ["a,b", "127.0.0.1:31337", "/ip4/999.0.0.1/tcp/1", "/nonsense/x"])
def test_an_entry_that_is_no_multiaddr_is_named_in_the_error(bad):
    with pytest.raises(ValueError, match="is not a peer multiaddr") as error:
        parse_peers([A, bad])
    assert repr(bad.split(",")[0]) in str(error.value) and "nectar dht" in str(error.value)


def test_explicit_peers_win_over_the_environment():
    env = {"NECTAR_INITIAL_PEERS": f"{B},{A}"}
    assert initial_peers([A], env=env) == [A]
    assert initial_peers(A, env=env) == [A]
    assert initial_peers(None, env=env) == initial_peers((), env=env) == initial_peers("", env=env) == [B, A]
    assert initial_peers(None, env={}) == []
