"""One hop of a route: a peer and the blocks [start, end) it computes for us."""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.p2p import PeerID

from nectar.wire.announce import ServerInfo


@dataclass(frozen=True)
class RemoteSpan:
    peer_id: PeerID
    start: int
    end: int
    info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"{self.info.public_name or str(self.peer_id)[-6:]}[{self.start}:{self.end}]"
