"""``ApiError``: what serving classes raise; the app's handlers turn it (and FastAPI's own errors) into OpenAI's
error format, ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nectar.api.protocol import ErrorInfo, ErrorResponse
from nectar.client.errors import InferenceFailedError, NodeBusyError, PaymentRequiredError
from nectar.wire.protocol import ErrorCode

logger = logging.getLogger(__name__)

TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answer: HTTP ``status`` plus OpenAI's error body. ``headers`` go out with it (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = ErrorResponse(
            error=ErrorInfo(
                message=message, type=type or TYPES_BY_STATUS.get(status, "server_error"), param=param, code=code
            )
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param=param, code=code)


def unavailable(message: str, *, code: str = "swarm_unavailable") -> ApiError:
    return ApiError(503, message, code=code)


def from_client_error(error: Exception) -> ApiError:
    """What the swarm's failure means for the caller: the request itself (400), unpaid work at the nodes (402, the
    gateway's own funding), or no route now (503, retry shortly: only tokens already delivered are charged)."""
    what = f"{type(error).__name__}: {error}"
    if isinstance(error, PaymentRequiredError):
        return ApiError(
            402,
            f"The nodes refused to work on credit ({what}). The gateway's escrow needs funds; tell the operator.",
            code="nodes_unpaid",
        )
    if isinstance(error, InferenceFailedError) and error.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE):
        return bad_request(
            f"The nodes refused this request ({what}): shorten it or lower n / max_tokens.", code=error.code.value
        )
    if isinstance(error, NodeBusyError):  # online nodes whose caches (or sessions per client) are full: back off
        return ApiError(
            503,
            f"The nodes are busy ({what}). Retry after the Retry-After header's seconds; nothing was charged.",
            code="nodes_busy",
            headers={"Retry-After": "2"},
        )
    return unavailable(
        f"The swarm could not finish this generation ({what}). Retry shortly; only tokens already "
        "delivered are charged."
    )


def _field_path(location) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in location)


def validation_error(exc: RequestValidationError) -> ApiError:
    """A 400 that names every bad field (``param`` is the first one): OpenAI and vLLM answer a malformed body with
    400, and the official client retries nothing on it."""
    problems, first = [], None
    for item in exc.errors():
        path = _field_path(item.get("loc", ()))
        first = first or path
        problems.append(f"'{path}': {item.get('msg', 'invalid')}")
    message = "Invalid request: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
    return ApiError(400, message, param=first, code="invalid_request_body")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route {request.method} {request.url.path}; see /docs for the API"
        return ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception(f"Unhandled error on {request.method} {request.url.path}")
        return ApiError(
            500,
            f"Internal error ({type(exc).__name__}); the request was not charged. Retry, and report it if it persists",
            type="server_error",
        ).response()
