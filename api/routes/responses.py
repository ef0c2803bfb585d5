"""Documented error answers, shared by the routes' OpenAPI entries."""

from __future__ import annotations

from nectar.api.protocol import ErrorResponse


def errors(*statuses: int) -> dict:
    text = {
        400: "Malformed body, unsupported parameter or invalid value (the message and ``param`` name the field).",
        401: "Missing, unknown or revoked API key.",
        402: "Insufficient credits for the request's worst case; the message says how to add credit.",
        403: "Not allowed (e.g. the faucet outside a devnet, a signature by another address).",
        404: "No such model, file, job or node.",
        409: "Conflict with existing state.",
        413: "Body or file too large.",
        429: "Rate limit of the key reached; see Retry-After.",
        503: "The swarm, chain, ledger or task broker is unavailable, or every generation slot is busy (see "
        "Retry-After); nothing was charged.",
    }
    statuses = tuple(sorted({400 if status == 422 else status for status in statuses}))  # malformed bodies: 400
    return {status: {"model": ErrorResponse, "description": text[status]} for status in statuses}


def sse_200(chunk_model: str) -> dict:
    """The 200 answer of an endpoint that streams ``chunk_model`` objects when ``stream`` is true."""
    return {
        200: {
            "description": f"The answer as JSON, or with ``stream: true`` a ``text/event-stream`` whose events are "
            f"``data: <{chunk_model}>`` lines, ending with ``data: [DONE]``.",
            # the schema of one event (OpenAPI 3.1 reads ``schema`` per event): its data is a JSON chunk, or [DONE]
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": f"One server-sent event: a {chunk_model} as JSON, or the last, ``[DONE]``.",
                        "required": ["data"],
                        "properties": {
                            "data": {
                                "description": f"A {chunk_model} as JSON, or ``[DONE]``.",
                                "anyOf": [
                                    {"const": "[DONE]"},
                                    {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                        "contentSchema": {"$ref": f"#/components/schemas/{chunk_model}"},
                                    },
                                ],
                            }
                        },
                    }
                }
            },
        }
    }
