"""Every error the HTTP routes answer, as JSON `{error, field, allowed}` with its status.

`add_error_handlers(api)` registers the mapping on the FastAPI app: a `RequestError` keeps
its own status (4xx for a bad request, 5xx the routes raise; a 503 comes with Retry-After),
a request FastAPI could not validate gets 422 with the field's description from the request
schema, FastAPI's and Starlette's own errors (unparseable body, unknown route) keep their
status, and anything else is a 500. A 500 tells the client only a request id: the
exception, which may show paths, shapes or data, goes to the replica's log under that id.
`validated` makes hand-built request models report the same way.
"""
import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .requests import RETRY_AFTER_S, ReconstructRequest, RequestError, SampleRequest

# the request schema of each route whose body is a model: its fields' descriptions say what is allowed
_SCHEMAS = {"/sample": SampleRequest, "/reconstruct": ReconstructRequest}


# Serve writes this logger's records to the replica's log (logs/serve/replica_<app>_<deployment>_*.log)
log = logging.getLogger("ray.serve")


def logged_server_error(e: BaseException, what: str) -> RequestError:
    """A 500 for the client (a request id, no detail) after logging e with its traceback
    under that id."""
    request_id = secrets.token_hex(8)
    log.error("request_id=%s: %s: %s: %s", request_id, what, type(e).__name__, e, exc_info=e)
    return RequestError("request", f"{what} (request_id {request_id}; the detail is in the service's log)",
                        "a retry; report it with the request_id if it persists", status=500, request_id=request_id)


async def _request_error(request: Request, e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    name = loc[0] if loc else "body"
    schema = next((m for path, m in _SCHEMAS.items() if request.url.path.endswith(path)), None)  # any route prefix
    fields = schema.model_fields if schema else {}
    if first.get("type") == "extra_forbidden":
        allowed = "the fields " + ", ".join(fields)
        error = "unknown field"
    else:
        allowed = fields[name].description if name in fields else "a JSON object (see /docs)"
        error = first.get("msg", "invalid value")
    return JSONResponse({"error": error, "field": name, "allowed": allowed}, status_code=422)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own errors (unparseable body, bad multipart, unknown route)
    in the same JSON shape."""
    if e.status_code in (404, 405):
        field, allowed = "path", "POST /sample, POST /reconstruct, GET /info, GET /healthz, GET /docs"
    else:
        field, allowed = "body", "a JSON object, or multipart form data for /reconstruct (see /docs)"
    return JSONResponse({"error": str(e.detail), "field": field, "allowed": allowed}, status_code=e.status_code,
                        headers=e.headers)


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    """Anything else (a bug): still JSON, the detail in the replica's log."""
    error = logged_server_error(e, "internal error")
    return JSONResponse(error.body(), status_code=500)


def add_error_handlers(api: FastAPI) -> None:
    """Answer every error of api's routes in the JSON shape above."""
    api.add_exception_handler(RequestError, _request_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _server_error)


def validated(build):
    """Pydantic models built by hand report like the ones FastAPI parses (JSON 422)."""
    try:
        return build()
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e
