"""HTTP plumbing shared by the control-plane API and the serving ingress: one error shape, one JSON reader,
one set of security headers.

Errors. Every error, 4xx and 5xx, is `{"detail": {"field": ..., "message": ..., "code": ...}}`, made by
`error_response` alone: `field` the dotted path of the offending input (`''` for none), `message` one sentence,
`code` a stable machine-readable word (`ERROR_CODES`, or a more specific one such as `duplicate_key`). The OpenAI
routes also carry OpenAI's `{"error": {...}}` beside it so its client parses them. A `FieldError` (the library's,
the service's) answers with its `status` (422 when it has none); pydantic's request errors become the same
`FieldError` through `causalt2i.errors.field_error`; JSON that cannot be read is a 400 naming `body`; a body
over the route's limit a 413 naming `body`. A fault of the server's own (a bug, corrupt storage, an unreachable
dependency) is a 5xx whose body says only that, with an opaque `correlation_id` (also in `X-Correlation-ID`);
the traceback is logged under that id and nothing of it (paths, exception text) reaches the client.

JSON. `SafeJSONRoute` reads request bodies with a parser whose failures are all bad input: a document nested
past the parser's depth or an integer of thousands of digits is a 400, not a 500; a key given twice in one
object, and `NaN`/`Infinity` or a number too large for a float, are 422s naming the field. With
`multipart_to_json` set, a multipart upload is turned into the route's JSON body model first, so one body
model (and its OpenAPI schema) serves both encodings.

Headers. `SecurityHeaders` sends `Content-Security-Policy`, `X-Frame-Options: DENY`,
`Referrer-Policy: no-referrer` and `X-Content-Type-Options: nosniff` on every response; an HTML page's inline
`<script>`/`<style>` blocks are allowed by their sha256 alone, so no `'unsafe-inline'` script is ever allowed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable

from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from causalt2i.errors import FieldError, field_error
from cluster.db import database_unavailable

DATABASE_RETRY_AFTER_S = 5


log = logging.getLogger("ct2i.http")

ERROR_CODES = {
    400: "malformed_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 411: "length_required", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_field",
    429: "over_limit", 500: "internal_error", 502: "bad_gateway", 503: "unavailable", 504: "timeout",
}
"""The default `code` of each status; a refusal may carry a more specific one (`duplicate_key`, `too_many_images`)."""


class ErrorDetail(BaseModel):
    field: Annotated[str, Field(description="the dotted path of the offending input, e.g. `spec.train.steps`; '' for none")]
    message: Annotated[str, Field(description="one sentence for a person; never a storage path or exception text")]
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", description="machine-readable: the status's default "
                               "(`invalid_field`, `not_found`, `over_limit`, ...) or a more specific word")]
    correlation_id: Annotated[str | None, Field(description="5xx only: quote it to the operators; the server logged "
                                                            "the fault under it")] = None


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    """Every error: `{"detail": {"field", "message", "code"}}`; the OpenAI routes add OpenAI's `error` object."""

    detail: ErrorDetail
    error: Annotated[OpenAIError | None, Field(description="OpenAI's error object, on `/v1/images/generations` and `/v1/models` only")] = None


def _responses(pairs) -> dict:
    return {status: {"model": ErrorBody, "description": text} for status, text in pairs}


ERROR_RESPONSES: dict = _responses((
    (400, "malformed request (e.g. JSON that cannot be read)"), (401, "missing, unknown or revoked API key"),
    (403, "the key may not do this"), (404, "no such object (or another tenant's)"), (409, "conflicts with the object's state"),
    (413, "request body too large, or too many images"), (422, "a field is invalid; `field` names it"),
    (429, "over a quota or rate limit (`Retry-After` says when to retry)"),
    (500, "a fault of the server's own; the body carries only a `correlation_id`")))
"""The statuses every /v1 route can answer with, each with the error body (routes add their own, e.g. 503)."""

UNAVAILABLE_RESPONSES: dict = _responses((
    (503, "a dependency (the generator, the database) is unavailable; retry after `Retry-After`"),
    (504, "not finished within the request timeout")))

OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_response(status: int, field: str, message: str, *, code: str | None = None,
                   headers: dict[str, str] | None = None, openai: bool = False,
                   correlation_id: str | None = None) -> JSONResponse:
    code = code or ERROR_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    detail: dict = {"field": field, "message": message, "code": code}
    headers = dict(headers or {})
    if correlation_id is not None:
        detail["correlation_id"] = correlation_id
        headers["X-Correlation-ID"] = correlation_id
    body: dict = {"detail": detail}
    if openai:
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, "param": field, "code": str(status)}, **body}
    return JSONResponse(body, status_code=status, headers=headers)


class HTTPProblem(FieldError):
    """A refusal with an explicit status (and headers, e.g. Retry-After, and optionally a specific `code`)."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(field, message)
        self.status = status
        self.headers = headers or {}
        if code is not None:
            self.code = code


class ServerFault(Exception):
    """A fault of the server's own that the caller cannot fix (corrupt storage, a replica gone): answered as a
    5xx with `public` as the message and a correlation id; `reason` (which may name paths) is only logged."""

    def __init__(self, reason: str, *, status: int = 500, public: str = "internal server error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.public = public
        self.code = code
        self.headers = headers or {}


def new_correlation_id() -> str:
    return secrets.token_hex(8)


def server_fault_response(request: Request, err: BaseException, *, openai: bool = False) -> JSONResponse:
    """Log `err` with its traceback under a fresh correlation id; answer with the id and nothing of `err`."""
    correlation_id = new_correlation_id()
    fault = err if isinstance(err, ServerFault) else None
    log.error("server fault %s on %s %s: %s", correlation_id, request.method, request.url.path,
              fault.args[0] if fault else type(err).__name__, exc_info=err)
    status = fault.status if fault else 500
    public = fault.public if fault else "internal server error"
    response = error_response(status, "", f"{public}; correlation id {correlation_id}", code=fault.code if fault else None,
                              headers=fault.headers if fault else None, openai=openai, correlation_id=correlation_id)
    response.headers.update(API_SECURITY_HEADERS)
    return response


def install_error_handlers(app: FastAPI, *, openai_paths: frozenset[str] = frozenset()) -> None:
    """The one error contract on `app`, its security headers, and an OpenAPI document whose `$ref`s resolve."""
    app.add_middleware(SecurityHeaders)
    install_schema_components(app)

    def respond(request: Request, status: int, field: str, message: str, headers=None, code=None) -> JSONResponse:
        return error_response(status, field, message, code=code, headers=headers, openai=request.url.path in openai_paths)

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, err: FieldError):
        return respond(request, getattr(err, "status", 422), err.field, err.message, getattr(err, "headers", None),
                       getattr(err, "code", None))

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, err: DBAPIError):
        # The database is down or restarting: a retryable 503, never a 500. Anything else is a real bug.
        if not database_unavailable(err):
            raise err
        return respond(request, 503, "request", "the database is unavailable; retry", {"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        problems = err.errors()
        if problems and problems[0].get("type") == "json_invalid":
            reason = (problems[0].get("ctx") or {}).get("error", "not JSON")
            return respond(request, 400, "body", f"malformed JSON: {reason}", code="malformed_json")
        found = field_error(problems, drop=("body", "query", "path", "header"))
        return respond(request, 422, found.field or "body", found.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        detail = err.detail
        if isinstance(detail, dict) and "field" in detail:
            return respond(request, err.status_code, detail["field"], detail.get("message", ""), err.headers, detail.get("code"))
        field = "body" if err.status_code in (400, 411, 413, 415) else "request"
        message = {413: "request body too large", 404: "no such route", 405: "method not allowed"}.get(err.status_code, str(detail))
        return respond(request, err.status_code, field, message, err.headers)

    @app.exception_handler(ServerFault)
    async def _server_fault(request: Request, err: ServerFault):
        return server_fault_response(request, err, openai=request.url.path in openai_paths)

    @app.exception_handler(Exception)  # Starlette's outermost layer: it answers, then re-raises for the server's log
    async def _unhandled(request: Request, err: Exception):
        return server_fault_response(request, err, openai=request.url.path in openai_paths)


# -- OpenAPI -------------------------------------------------------------------------------------------------------

_DOCUMENTED: dict[str, type[BaseModel]] = {}


def schema_ref(model: type[BaseModel]) -> dict:
    """`{"$ref": ...}` to `model` in the OpenAPI document's components, for a schema written by hand into a route's
    `responses` or `openapi_extra` (an SSE stream, a multipart body): pydantic's own `$defs` would not resolve
    there. `install_schema_components` adds the model and everything it refers to."""
    _DOCUMENTED[model.__name__] = model
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def install_schema_components(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        document = generate()
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _DOCUMENTED.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            for nested, definition in schema.pop("$defs", {}).items():
                components.setdefault(nested, definition)
            components.setdefault(name, schema)
        app.openapi_schema = document
        return document

    app.openapi = openapi


# -- JSON ----------------------------------------------------------------------------------------------------------


class _Object(dict):
    """A JSON object as the reader builds it, remembering a key it saw twice."""

    duplicate: str | None = None


class _NonFinite:
    """`NaN`, `Infinity`, or a number that overflows a float: kept as a marker so its path can be named."""

    def __init__(self, text: str):
        self.text = text


def _object(pairs: list[tuple[str, object]]) -> _Object:
    made = _Object()
    for key, value in pairs:
        if key in made and made.duplicate is None:
            made.duplicate = key
        made[key] = value
    return made


def _float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _first_problem(value, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str, str] | None:
    """(path, message, code) of the first duplicate key or non-finite number in a parsed document."""
    if isinstance(value, _NonFinite):
        return path, f"must be a finite number, got {value.text[:40]}", "non_finite_number"
    if isinstance(value, _Object):
        if value.duplicate is not None:
            return (*path, value.duplicate), "this key appears more than once in its object", "duplicate_key"
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), item) for i, item in enumerate(value))
    else:
        return None
    for key, item in items:
        if (found := _first_problem(item, (*path, str(key)))) is not None:
            return found
    return None


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _read_json(body: bytes):
    try:
        parsed = json.loads(body, object_pairs_hook=_object, parse_float=_float, parse_constant=_NonFinite)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as err:  # nested past the parser's depth; an integer of > 4300 digits; not UTF-8
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise json.JSONDecodeError(reason, body[:80].decode("utf-8", "replace"), 0) from None
    try:
        problem = _first_problem(parsed)
        plain = _plain(parsed)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", body[:80].decode("utf-8", "replace"), 0) from None
    if problem is not None:
        path, message, code = problem
        raise HTTPException(422, {"field": ".".join(path) or "body", "message": message, "code": code})
    return plain


class _SafeJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = _read_json(await self.body())
        return self._json


MultipartConverter = Callable[[Request], Awaitable[dict]]


def _with_json_body(request: Request, payload: dict) -> Request:
    data = json.dumps(payload).encode()
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return _SafeJSONRequest({**request.scope, "headers": headers}, receive)


class SafeJSONRoute(APIRoute):
    """A route whose JSON body is read by `_read_json`. `multipart_route(convert)` makes the variant that also
    takes multipart uploads."""

    multipart: MultipartConverter | None = None

    def get_route_handler(self):
        handler = super().get_route_handler()
        convert = self.multipart

        async def route_handler(request: Request):
            safe = _SafeJSONRequest(request.scope, request.receive)
            if convert is not None and request.headers.get("content-type", "").startswith("multipart/form-data"):
                safe = _with_json_body(safe, await convert(safe))
            return await handler(safe)

        return route_handler


def multipart_route(convert: MultipartConverter) -> type[SafeJSONRoute]:
    """A `SafeJSONRoute` class that also takes multipart uploads, converted to the JSON body by `convert`."""
    return type("MultipartJSONRoute", (SafeJSONRoute,), {"multipart": staticmethod(convert)})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class BodyLimit:
    """ASGI middleware: a request body over its route's limit is a 413 naming `body`, by Content-Length or while
    it streams in. `limits` maps exact paths to their limit; every other path gets `default`."""

    def __init__(self, app, default: int, limits: dict[str, int] | None = None):
        self.app = app
        self.default = default
        self.limits = dict(limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope.get("path", ""), self.default)
        too_large = error_response(413, "body", f"request body over {limit} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


# -- security headers ----------------------------------------------------------------------------------------------

API_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
"""What every non-HTML response carries: nothing may be loaded, framed or referred from it."""

PAGE_POLICY = ("default-src 'none'; script-src 'self'{scripts}; style-src 'self'{styles}; img-src 'self' data: blob:; "
               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
"""An HTML page's policy: its own files, its inline blocks by hash, images it made (data:/blob:), its own origin."""

DOCS_PATHS = frozenset({"/docs", "/redoc"})
DOCS_POLICY = ("default-src 'none'; script-src 'self' https://cdn.jsdelivr.net{scripts}; "
               "style-src 'self' https://cdn.jsdelivr.net https://fonts.googleapis.com 'unsafe-inline'; "
               "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; font-src https://fonts.gstatic.com; "
               "worker-src blob:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
"""FastAPI's /docs and /redoc load Swagger UI / ReDoc from their CDN and style themselves at run time; their
one inline script is still allowed only by its hash."""

_INLINE = re.compile(rb"<(script|style)(\s[^>]*)?>(.*?)</\1\s*>", re.S | re.I)


def inline_hashes(html: bytes) -> dict[str, list[str]]:
    """CSP source expressions (`'sha256-…'`) for each inline `<script>` (without `src`) and `<style>` block."""
    found: dict[str, list[str]] = {"script": [], "style": []}
    for match in _INLINE.finditer(html):
        tag, attributes, content = match.group(1).lower().decode(), match.group(2) or b"", match.group(3)
        if tag == "script" and re.search(rb"\ssrc\s*=", b" " + attributes, re.I):
            continue
        found[tag].append(f"'sha256-{base64.b64encode(hashlib.sha256(content).digest()).decode()}'")
    return found


def page_policy(html: bytes, *, docs: bool = False) -> str:
    hashes = inline_hashes(html)
    scripts = "".join(" " + h for h in hashes["script"])
    if docs:
        return DOCS_POLICY.format(scripts=scripts)
    return PAGE_POLICY.format(scripts=scripts, styles="".join(" " + h for h in hashes["style"]))


class SecurityHeaders:
    """ASGI middleware: `API_SECURITY_HEADERS` on every response; an HTML response is read whole (pages are
    small) so its policy can allow its own inline blocks by hash. Headers a route set itself are kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        docs = scope.get("path", "") in DOCS_PATHS
        held: dict | None = None
        chunks: list[bytes] = []

        def with_headers(message: dict, policy: str | None) -> dict:
            headers = [(k, v) for k, v in message.get("headers", [])]
            present = {k.lower() for k, _ in headers}
            for name, value in API_SECURITY_HEADERS.items():
                if name == "Content-Security-Policy" and policy is not None:
                    value = policy
                if name.lower().encode() not in present:
                    headers.append((name.lower().encode(), value.encode()))
            return {**message, "headers": headers}

        async def secured_send(message):
            nonlocal held
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"text/html"):
                    held = message
                    return
                return await send(with_headers(message, None))
            if message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                html = b"".join(chunks)
                start = with_headers(held, page_policy(html, docs=docs))
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"].append((b"content-length", str(len(html)).encode()))
                await send(start)
                return await send({"type": "http.response.body", "body": html, "more_body": False})
            return await send(message)

        await self.app(scope, receive, secured_send)
