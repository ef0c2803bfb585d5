"""What a test's only node reports of its compute (its info RPC's ``compute`` counters)."""

from __future__ import annotations

from nectar.wire.protocol import RPC_INFO, make_request, unpack_metadata
from nectar.wire.stubs import call_unary


def node_compute_counters(model) -> dict:
    """The compute counters of the one node serving ``model``'s swarm."""
    model.sequence_manager.update(force=True)
    ((peer, info),) = {p: i for block in model.sequence_manager.servers().values() for p, i in block.items()}.items()
    response = model.runtime.run(
        call_unary(model.runtime.p2p, peer, info, RPC_INFO, make_request("", [], {}), timeout=20), timeout=30
    )
    return unpack_metadata(response.metadata)["compute"]
