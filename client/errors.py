"""The errors the client raises for what happened in the swarm, so callers (the API among them) can answer each
for what it is: no route (503), the request itself (400), unpaid work (402), a dishonest node (retry).

Every class is a ``RuntimeError``, as the client raised before these had names: ``except RuntimeError`` still
catches them. Bad arguments to the client's own functions stay ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

from nectar.wire.protocol import ErrorCode


class NectarClientError(RuntimeError):
    """Base of the client's errors."""


class RouteUnavailableError(NectarClientError):
    """No online node serves some blocks, or every node tried for them failed (banned for a while).

    :ivar start, end: the blocks [start, end) that found no route (None where unknown)
    :ivar blocks: the blocks no online node serves at all (empty when nodes serve them but failed)
    """

    def __init__(self, message: str, *, start: int | None = None, end: int | None = None, blocks: Sequence[int] = ()):
        super().__init__(message)
        self.start, self.end, self.blocks = start, end, list(blocks)


class ReceiptRejectedError(NectarClientError):
    """A node's receipt failed the client's checks (signer, commitments, price); the node is treated as faulty."""


class InferenceFailedError(NectarClientError):
    """A node answered with an ``ErrorCode`` (every retry did: e.g. the request is too large for any node).

    :ivar code: what the node reported; BAD_REQUEST and TOO_LARGE mean the request itself must change
    """

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code

    @staticmethod
    def of(code: ErrorCode, message: str) -> InferenceFailedError:
        """The most specific class for ``code``."""
        if code is ErrorCode.CREDIT_LIMIT:
            return PaymentRequiredError(message)
        if code is ErrorCode.CACHE_FULL:
            return NodeBusyError(message)
        return InferenceFailedError(code, message)


class PaymentRequiredError(InferenceFailedError):
    """Nodes refused to work on credit (``CREDIT_LIMIT``): the client's vouchers do not cover what it owes."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.CREDIT_LIMIT, message)


class NodeBusyError(InferenceFailedError):
    """The nodes serving some blocks are busy (``CACHE_FULL``: their KV cache is held by other sessions now); they
    are online: retry in a few seconds."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.CACHE_FULL, message)


class SessionClosedError(NectarClientError):
    """A step was sent to an inference session after ``close()``."""
