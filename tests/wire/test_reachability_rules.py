"""What a reachability helper agrees to dial, relayed records, and the price of an unmeasured relay hop."""

import dataclasses

import pytest
from hivemind.p2p import PeerID

from nectar.client.routing.sequence_manager import RELAY_LATENCY, UNMEASURED_LATENCY
from nectar.wire.announce import ServerInfo
from nectar.wire.reachability import tcp_target
from nectar.wire.swarm import is_relayed
from tests.client.test_routing import _info, _manager, _peer

ASKER = PeerID.from_base58("QmXYeFtVr5oXfPb5mJp5PfHbZfNmnxLJ8Su8SmNT7hjQrs")
OTHER = PeerID.from_base58("12D3KooWEgQaEcLpN1eSNzPmu9PeLSxJkEJKBcgSACzdvsVvYCWZ")


@pytest.mark.parametrize(
    "addr, target",
    [
        ("/ip4/1.2.3.4/tcp/31337", ("1.2.3.4", 31337)),
        (f"/ip4/1.2.3.4/tcp/31337/p2p/{ASKER}", ("1.2.3.4", 31337)),
        ("/ip6/::1/tcp/5", ("::1", 5)),
        (f"/ip4/1.2.3.4/tcp/31337/p2p/{OTHER}", None),  # someone else's id
        ("/dns4/example.org/tcp/1", None),  # names are not resolved
        (f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER}/p2p-circuit/p2p/{ASKER}", None),  # a relay's address
        ("/ip4/1.2.3.4/udp/1/quic", None),
        ("/ip4/1.2.3.4/tcp/0", None),
        ("/ip4/1.2.3.4/tcp/70000", None),
        ("/ip4/1.2.3.4/tcp/" + "1" * 300, None),
        (42, None),
    ],
)
def test_a_helper_dials_only_plain_tcp_addresses_of_the_asker(addr, target):
    assert tcp_target(addr, ASKER) == target


def test_relay_circuits_are_recognised():
    assert is_relayed(f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER}/p2p-circuit")
    assert not is_relayed("/ip4/1.2.3.4/tcp/1")


def test_relayed_must_be_a_boolean_in_a_record():
    record = _info(0, 4).to_dict()
    assert ServerInfo.from_dict({**record, "relayed": True}).relayed is True
    assert ServerInfo.from_dict(record).relayed is False  # older nodes' records
    with pytest.raises(ValueError, match="relayed"):
        ServerInfo.from_dict({**record, "relayed": "yes"})


def test_an_unmeasured_relayed_node_costs_a_relay_hop_more():
    direct, relayed = _peer(1), _peer(2)
    manager = _manager({direct: _info(0, 8), relayed: dataclasses.replace(_info(0, 8), relayed=True)})
    info = manager._servers[0][relayed]
    assert manager.latency(relayed, info) == pytest.approx(UNMEASURED_LATENCY + RELAY_LATENCY)
    assert manager.latency(direct, manager._servers[0][direct]) == pytest.approx(UNMEASURED_LATENCY)
    assert manager.make_inference_route()[0].peer_id == direct  # same claims: the direct node wins
    manager._latency = {relayed: 0.02}  # once measured, the ping (through the relay) is the price
    assert manager.latency(relayed, info) == 0.02
