"""The gateway answers a swarm failure by what happened: the request (400), unpaid nodes (402), no route (503)."""

from nectar.api.errors import from_client_error
from nectar.client.errors import (
    InferenceFailedError,
    PaymentRequiredError,
    ReceiptRejectedError,
    RouteUnavailableError,
)
from nectar.wire.protocol import ErrorCode


def test_each_client_error_gets_its_status():
    cases = [
        (InferenceFailedError(ErrorCode.TOO_LARGE, "too many tokens"), 400),
        (InferenceFailedError(ErrorCode.BAD_REQUEST, "bad shape"), 400),
        (InferenceFailedError.of(ErrorCode.CREDIT_LIMIT, "pay first"), 402),
        (PaymentRequiredError("pay first"), 402),
        (InferenceFailedError(ErrorCode.CACHE_FULL, "busy"), 503),
        (RouteUnavailableError("no node serves blocks 3:5", start=3, end=5, blocks=[3, 4]), 503),
        (ReceiptRejectedError("bad signature"), 503),
        (RuntimeError("anything else"), 503),
    ]
    for error, status in cases:
        answer = from_client_error(error)
        assert answer.status == status, (error, answer.status)
        assert type(error).__name__ in answer.body.error.message
