"""Every error leaves in the OpenAI envelope {"error": {"message", "type", "param", "code"}}, with no internals."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError, bad_request

log = logging.getLogger("latentmoe.server")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its generation has been aborted)."""


def _json(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request, e: APIError):
    return _json(e)


async def _validation_error(request, e):
    return _json(bad_request("invalid request"))


async def _http_error(request, e):   # unknown path (404), wrong method (405)
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _json(APIError(e.status_code, str(e.detail), kind))


async def _client_gone(request, e):
    return Response(status_code=499)   # nobody reads it; the connection is closed


async def _internal_error(request, e):
    log.exception("internal error")   # the details stay in the server log, never in the response
    return _json(APIError(500, "internal server error", "internal_server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
