"""JSON responses and error handlers: every answer encodes, and a bad request is never a 5xx.

Contract of every JSON body this server sends through :class:`SafeJSONResponse` or the
handlers installed by :func:`install_error_handlers`:

* it is valid UTF-8 JSON. A Python ``str`` can hold lone surrogates (agent code can raise
  ``ValueError('\\udcff')``, JSON can carry ``"\\ud800"``, and FastAPI's 422 echoes the bad
  ``input``), and one such character made Starlette's ``JSONResponse`` raise while encoding,
  i.e. a 500 that also lost the observation it carried. They are backslash-escaped
  (:func:`models.escape_surrogates`); non-finite floats (``1e999`` in a body parses to
  ``inf``, which strict JSON cannot carry) become the strings ``"inf"``/``"-inf"``/``"nan"``;
* a body FastAPI cannot parse is a **422** ``json_invalid``, as the README promises: FastAPI
  answers 422 only for a ``JSONDecodeError`` and a 400 "There was an error parsing the body"
  for every other failure of ``json.loads``: bytes that are not UTF-8, an integer longer than
  CPython's 4,300-digit conversion limit, nesting deeper than the decoder's recursion limit;
* a 422 echoes each bad ``input`` bounded (strings clipped to ``ECHO_CHARS``, containers to
  ``ECHO_ITEMS`` items and ``ECHO_DEPTH`` levels, non-JSON values as text), so a 1 MiB body is
  not sent back whole, a deeply nested one cannot exhaust the encoder's recursion, and
  non-UTF-8 bytes (the ``input`` of a body sent as ``text/plain``) cannot fail to decode;
* ``HTTPException`` answers keep their status and headers (``Allow``, ``Retry-After``) and
  carry ``{"detail": ...}``.

:data:`ERROR_RESPONSES` documents these bodies in OpenAPI.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tracefix_rl.models import escape_surrogates

log = logging.getLogger("tracefix_rl.server")

ECHO_CHARS = 200
ECHO_ITEMS = 20
ECHO_DEPTH = 4
ENCODE_DEPTH = 64  # deeper than any document this server builds (an observation is 3 deep)
BIG_INT_BITS = 256  # larger integers are echoed as a description, not their digits

# FastAPI's detail for a body json.loads() rejected with anything but JSONDecodeError
# (fastapi/routing.py); pinned by tests/test_http.py, which expects 422 for each such body.
FASTAPI_BODY_PARSE_DETAIL = "There was an error parsing the body"


def _clip(text: str, limit: int = ECHO_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)


def encodable(value: Any, depth: int = ENCODE_DEPTH) -> Any:
    """``value`` (JSON-like data) with every string made UTF-8 encodable, every float finite
    and nesting cut at ``depth`` levels, so ``json.dumps(..., allow_nan=False)`` and UTF-8
    encoding cannot fail."""
    if isinstance(value, str):
        return escape_surrogates(value)
    if isinstance(value, float):
        return _number(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if depth <= 0:
        return "..."
    if isinstance(value, dict):
        return {escape_surrogates(str(k)): encodable(v, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable(v, depth - 1) for v in value]
    return escape_surrogates(str(value))


def echo(value: Any, depth: int = ECHO_DEPTH) -> Any:
    """A bounded, encodable copy of a client's ``input`` for an error body."""
    if isinstance(value, str):
        return escape_surrogates(_clip(value))
    if isinstance(value, (bytes, bytearray)):
        return escape_surrogates(_clip(bytes(value[: ECHO_CHARS * 4]).decode(errors="replace")))
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, int) and not isinstance(value, bool):
        bits = value.bit_length()
        return value if bits <= BIG_INT_BITS else f"<integer of {bits} bits>"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if depth <= 0:
            return f"<object of {len(value)} keys>"
        items = list(value.items())[:ECHO_ITEMS]
        return {escape_surrogates(_clip(str(k))): echo(v, depth - 1) for k, v in items}
    if isinstance(value, (list, tuple)):
        if depth <= 0:
            return f"<array of {len(value)} items>"
        return [echo(v, depth - 1) for v in list(value)[:ECHO_ITEMS]]
    return escape_surrogates(_clip(str(value)))


class SafeJSONResponse(JSONResponse):
    """Starlette's ``JSONResponse`` that never fails to render (see the module docstring).

    The common case costs what ``JSONResponse`` costs; only content that fails to encode is
    walked and repaired.
    """

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
            return super().render(encodable(content))


class ErrorDetail(BaseModel):
    """Body of every 4xx/5xx answer other than a 422."""

    detail: str = Field(description="What went wrong and what to do about it.")


class ValidationIssue(BaseModel):
    """One problem with a request, in FastAPI's shape."""

    type: str = Field(description="Error kind, e.g. `missing`, `int_type`, `json_invalid`.")
    loc: list[str | int] = Field(description="Where: `body`, `query` or `cookie`, then the path.")
    msg: str
    input: Any = Field(default=None, description="The offending value, bounded and escaped.")
    ctx: dict[str, Any] | None = None


class ValidationErrors(BaseModel):
    """Body of every 422."""

    detail: list[ValidationIssue]


def error_body(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return SafeJSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_item(error: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": str(error.get("type", "value_error")),
        "loc": [
            p if isinstance(p, int) and not isinstance(p, bool) else str(p)
            for p in error.get("loc", ())
        ],  # fmt: skip
        "msg": _clip(str(error.get("msg", "")), ECHO_CHARS * 2),
        "input": echo(error.get("input")),
    }
    ctx = error.get("ctx")
    if isinstance(ctx, dict):
        item["ctx"] = {str(k): echo(v) if isinstance(v, (str, int, float, bool)) or v is None
                       else _clip(str(v)) for k, v in ctx.items()}  # fmt: skip
    return item


def validation_response(errors: Iterable[dict[str, Any]]) -> Response:
    """A 422 in FastAPI's shape (``{"detail": [{type, loc, msg, input, ctx?}]}``), bounded."""
    return SafeJSONResponse({"detail": [_validation_item(e) for e in errors]}, status_code=422)


def _body_parse_error(exc: StarletteHTTPException) -> BaseException | None:
    """The ``json.loads`` failure behind FastAPI's 400 "error parsing the body", if it is one."""
    cause = exc.__cause__
    parse_failure = exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_DETAIL
    return cause if parse_failure and isinstance(cause, (ValueError, RecursionError)) else None


def _parse_error_message(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the JSON is nested too deeply"
    return str(cause)


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> Response:
    cause = _body_parse_error(exc)
    if cause is not None:
        return validation_response([{
            "type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
            "input": {}, "ctx": {"error": _parse_error_message(cause)},
        }])  # fmt: skip
    headers = getattr(exc, "headers", None)
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=headers)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(encodable(exc.detail))
    return error_body(exc.status_code, detail, headers)


async def validation_exception_handler(request: Request, exc: RequestValidationError) -> Response:
    return validation_response(exc.errors())


def install_error_handlers(app: FastAPI) -> None:
    """Route every ``HTTPException`` and request validation error through this module."""
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_exception_handler)  # type: ignore[arg-type]


def _error(description: str, model: type[BaseModel] = ErrorDetail, **extra: Any) -> dict:
    return {"model": model, "description": description, **extra}


SHUTTING_DOWN = "the server is shutting down (retry on another instance or later)"
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds until an episode slot can be freed (sent with a full store).",
        "schema": {"type": "integer", "minimum": 1},
    }
}

ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: _error("The request names no episode, or a task that does not exist."),
    404: _error("Unknown or expired episode."),
    413: _error("The request body is larger than MAX_REQUEST_BYTES."),
    422: _error("Malformed JSON, a body that is not UTF-8, or an invalid field.", ValidationErrors),
    503: _error(f"Unavailable: {SHUTTING_DOWN}."),
}


def documented(*statuses: int, **overrides: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` argument of a route: the given error statuses, plus the two every
    route can answer, 413 (the body limit) and 503 (shutdown), and per-status ``overrides``
    keyed ``s503=...``."""
    chosen = {413, 503, *statuses}
    out: dict[int | str, dict[str, Any]] = {s: dict(ERROR_RESPONSES[s]) for s in sorted(chosen)}
    for key, value in overrides.items():
        out[int(key.removeprefix("s"))] = value
    return out
