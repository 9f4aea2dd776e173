"""`diffrt serve`: the HTTP service (FastAPI + uvicorn).

    POST /v1/generate   JSON body (schema.py) -> image/png, or JSON with base64 PNGs when
                        `Accept: application/json` or num_images > 1
    GET  /healthz       liveness: the worker thread is alive and its engine not failing batch after batch
    GET  /readyz        readiness: model loaded, one warm-up run, NaN self-test passed
    GET  /metrics       Prometheus exposition (metrics.py)
    GET  /openapi.json, /docs

Every answer names the backend that ran it (`X-Diffrt-Backend`, RELIABILITY #15), its seed and
request id, and its timings (`Server-Timing`). The request id (`X-Request-Id`) is the client's or its proxy's
where it sends one, else a new one; every /v1 answer carries it, refusals too, and so do the service's log
lines about the request. A text-to-image answer whose prompt was cut at the
text encoder's length says so (RELIABILITY #13): JSON answers carry the dropped text in
`truncated` / `truncated_negative`, PNG answers the header `X-Diffrt-Prompt-Truncated: true`.
Refusals are JSON `{"detail", "field"}` with the status that fits: 400 malformed JSON, 401 API
key, 413 body or image too large, 415 not JSON, 422 a field the schema or the model refuses,
429 queue full, 503 not ready, 504 over the timeout. A client that hangs up before its answer
(closed socket, a proxy's timeout, a retry, or one gone while still sending its body) has its request
given up, queued or running, and is counted as 499, nginx's "client closed request"; no answer can reach it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffrt.errors import DiffrtError
from diffrt.serve.batching import Answer
from diffrt.serve.runtime import RuntimeConfig, ServeRuntime
from diffrt.serve.schema import GenerateBody, RequestError, describe_validation_errors

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # Host header names of a loopback service
# Read by probes and scrapers, which address a pod by its IP (Kubernetes' httpGet sends Host: <pod IP>:<port>): an IP
# address is a Host they answer, so that --allowed-host does not take the pod out of rotation. A page that rebinds its
# own name to the service sends that name, never an address, and is still refused.
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")
GENERATE_PATH = "/v1/generate"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before its answer: metrics only, never sent


@dataclass
class ServeConfig:
    model: str | None = None  # diffusers or artifact folder; None: the shipped digits model
    controlnet: str | list[str] | None = None  # ControlNet folder(s) for a text-to-image diffusers folder (an artifact carries its own)
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file, scale) fused at open; requests scale them by lora_scale
    backend: str = "onnxruntime"
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key_env: str | None = "DIFFRT_API_KEY"  # env var holding the key; unset or empty: no key
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_ms: float = 10.0
    timeout_s: float = 60.0
    device: str | None = None  # None: cuda when available
    max_body_bytes: int = 16 << 20
    body_timeout_s: float = 30.0  # a body not whole by then is a 408 (a slow sender held a connection for ever)
    max_connections: int | None = None  # /v1 requests in flight at once (reading, queued, running); None: 2 x the queue's room
    allowed_hosts: tuple[str, ...] | None = None  # Host header names served; None: any (serve() binds loopback to loopback's)
    allowed_origins: tuple[str, ...] = ()  # web origins besides the service's own (a site behind a proxy that rewrites Host)
    max_image_bytes: int = 8 << 20
    max_image_side: int = 0  # pixels; 0: twice the model's own side on eager PyTorch, 4096 on engines
    warmup_steps: int = 2
    exact_batching: bool = True  # False: batch requests even on a backend whose batches differ in the last bit
    strict: bool = False  # any fallback (ONNX Runtime provider, PyTorch for an artifact) fails the load
    cuda_graph: bool = True  # tensorrt: replay captured CUDA graphs
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 < self.body_timeout_s < float("inf"):
            raise DiffrtError(f"--body-timeout must be a number of seconds > 0, got {self.body_timeout_s!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int) or self.max_connections < 1):
            raise DiffrtError(f"--max-connections must be an integer >= 1, got {self.max_connections!r}")

    def runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig(model=self.model, backend=self.backend, device=self.device, max_batch_size=self.max_batch_size,
                             max_queue=self.max_queue, batch_wait_ms=self.batch_wait_ms, timeout_s=self.timeout_s,
                             max_image_bytes=self.max_image_bytes, max_image_side=self.max_image_side, warmup_steps=self.warmup_steps,
                             exact_batching=self.exact_batching, controlnet=self.controlnet, loras=self.loras, strict=self.strict,
                             cuda_graph=self.cuda_graph)

    def api_key(self) -> str | None:
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None


# -- responses shared with the Ray Serve deployment ----------------------------------------------

MAX_HEADER_BYTES = 64 << 10  # a request's line and headers: browsers and proxies send a few KB (nginx: 8 KB per line)
UNREADABLE_BODY = "the body is not JSON diffrt can read (a number with thousands of digits, or nesting thousands deep?)"


def body_text_problem(raw: bytes) -> str | None:
    """None if the body decodes as the Unicode text JSON must be (UTF-8, or UTF-16/32 as json.loads detects them);
    else the line for its 400, which named numbers and nesting instead."""
    encoding = json.detect_encoding(raw)
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as exc:
        return f"the body is not valid {encoding.upper().replace('-SIG', '')} text (at byte {exc.start}); send JSON encoded as UTF-8"
    return None


def too_large_response(size: int, limit: int) -> JSONResponse:
    return error_response(413, f"request body is {size / 2**20:.1f} MiB or more; the limit is {limit / 2**20:.1f} MiB")


MAX_BODY_VALUES = 10_000  # JSON values in a body: a request holds a few dozen (its longest list: one per ControlNet)


def body_fields_problem(raw: bytes) -> str | None:
    """The 422 line for a JSON object of more fields than a generate request has (GenerateBody's), or of more values
    than MAX_BODY_VALUES anywhere inside, else None (a body that is not JSON is left to the parser, whose answer names
    why). FastAPI parses the body again on the event loop: only a body that is cheap to parse gets there."""
    repeated: list[str] = []

    def unique_keys(pairs: list[tuple]) -> dict:  # json.loads keeps the last of a key named twice, silently
        names = set()
        for key, _ in pairs:
            if key in names:
                repeated.append(key)
                break
            names.add(key)
        return dict(pairs)

    try:
        data = json.loads(raw, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):
        return None
    if repeated:  # also what made a 14 MB body of one key repeated pass the counts below (they see one field)
        return f"the body names {repeated[0][:100]!r} more than once; send each field once"
    fields = GenerateBody.model_fields
    if isinstance(data, dict) and len(data) > len(fields):
        unknown = [key for key in list(data)[:1000] if key not in fields][:3]
        return (f"the body has {len(data)} fields; a generate request has at most {len(fields)} "
                f"(unknown: {', '.join(map(repr, unknown))}, ...)")
    pending, seen = [data], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > MAX_BODY_VALUES:
            return f"the body holds more than {MAX_BODY_VALUES:,} JSON values; a generate request holds a few dozen"
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return None


def parse_body(raw: bytes) -> "GenerateBody | JSONResponse":
    """A generate body as FastAPI reads one for `diffrt serve` (json.loads, a UTF-8 BOM allowed, then the schema),
    or the answer the service gives when it cannot: for the Ray route, so that both answer a body alike."""
    problem = body_text_problem(raw)
    if problem:
        return error_response(400, problem)
    problem = body_fields_problem(raw)
    if problem:
        return error_response(422, problem)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:  # FastAPI's json_invalid error, through the service's handler
        return validation_error_response([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                           "ctx": {"error": exc.msg}}])
    except (ValueError, RecursionError):  # what FastAPI answers with its bare 400, in the service's words
        return error_response(400, UNREADABLE_BODY)
    try:
        return GenerateBody.model_validate(data)
    except ValidationError as exc:
        return validation_error_response(exc.errors(include_input=False))


def error_response(status: int, detail: str, field: str | None = None, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field, **extra}, status_code=status, headers=headers)


def request_error_response(exc: RequestError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.field, exc.headers)


def validation_error_response(errors: list[dict]) -> JSONResponse:
    status, message, clean = describe_validation_errors(errors)
    # One field at fault, though it may fail several ways (a float-or-list field: one error per branch of the union).
    fields = {entry["field"].split(".")[0] if entry["field"] else None for entry in clean}
    field = fields.pop() if len(fields) == 1 else None
    return error_response(status, message, field, errors=clean)


# What a client or proxy may name its request by (nginx's $request_id, Envoy's and Heroku's X-Request-Id): printable
# ASCII without spaces, as a header value and a log line take it unchanged.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id(headers) -> str:
    """The request's id: the X-Request-Id its client (or a proxy) sent, where it is one (REQUEST_ID), else a new one.
    Two requests may come with one id (a client's retry): it names them, the batch matches answers by its own."""
    given = headers.get("x-request-id")
    return given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def accepts_json(accept: str) -> bool:
    """Whether an Accept header lists application/json, and not at q=0 (which refuses it)."""
    for entry in accept.lower().split(","):
        kind, *params = (part.strip() for part in entry.split(";"))
        if kind == "application/json":
            q = next((p.partition("=")[2].strip() for p in params if p.partition("=")[0].strip() == "q"), "1")
            try:
                return float(q) > 0
            except ValueError:
                return True
    return False


def answer_response(answer: Answer, accept: str) -> Response:
    timings = ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in answer.timings_ms.items())
    # X-Request-Id: set on every /v1 answer by GuardMiddleware (on Ray Serve, by Ray's proxy).
    headers = {"X-Diffrt-Backend": answer.backend, "X-Diffrt-Seed": str(answer.seed),
               "X-Diffrt-Batch-Size": str(answer.batch_size), "Server-Timing": timings}
    truncated = answer.truncated or {}
    if any(text is not None for cut in truncated.values() for text in cut or []):
        headers["X-Diffrt-Prompt-Truncated"] = "true"  # the text itself may not be latin-1: it is in the JSON answer
    if len(answer.images) == 1 and not accepts_json(accept):
        return Response(answer.images[0], media_type="image/png", headers=headers)
    images = [{"index": i, "seed": answer.seed, "png_base64": base64.b64encode(png).decode("ascii")} for i, png in enumerate(answer.images)]
    return JSONResponse({"id": answer.request_id, "backend": answer.backend, "seed": answer.seed, "images": images,
                         "batch_size": answer.batch_size, "timings_ms": answer.timings_ms, **truncated}, headers=headers)


# -- a client that hangs up --------------------------------------------------------------------

async def disconnected(receive) -> None:
    """Return once the client has hung up: the ASGI server's `http.disconnect`. Called after the body
    is read (GuardMiddleware reads it whole, FastAPI parsed it), so `receive` has nothing else to
    hand over and blocks until the connection closes (or the response is complete, when nobody
    listens any more). Event-driven: a request that completes normally waits for no poll."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # more body than was read: not expected after a whole body; no busy loop if it happens


async def answer_unless_gone(generating: Awaitable[Answer], receive) -> Answer:
    """`generating`'s answer, unless the client hangs up first: then it is cancelled (the runtime gives
    the request's rows up: a queued one never runs, a running batch of only such rows stops at its
    next step) and the request ends as 499, which counts in the metrics and reaches nobody. A client that half-closes
    its socket once its request is sent (`shutdown(SHUT_WR)`, `nc -N`) reads as gone too, as nginx takes it."""
    work = asyncio.ensure_future(generating)
    watch = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        if not work.done() and watch.exception() is not None:  # cannot tell: just wait, as without the watch
            log.debug("watching for the client's disconnect failed", exc_info=watch.exception())
            await asyncio.wait((work,))
        if not work.done():  # the client has gone
            work.cancel()
            await asyncio.wait((work,))  # the runtime gives the rows up before the 499 is counted
    finally:  # also when this request's own task is cancelled (server shutdown): the work stops with it
        watch.cancel()
        work.cancel()  # a no-op once it is done
        if watch.done() and not watch.cancelled():
            watch.exception()  # retrieved: no "exception never retrieved" in the log
    if not work.cancelled():  # done, or answered in the same instant the client left
        return work.result()
    raise RequestError(CLIENT_CLOSED_REQUEST, "the client closed the connection before its images were made")


# -- guards in front of the app (before the body is parsed) -----------------------------------

def content_type_problem(headers) -> str | None:
    """None if the body is declared JSON (or not declared: JSON is assumed), else the 415's message."""
    kind = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    return None if kind == "application/json" else f"Content-Type must be application/json, got {kind}"


def api_key_problem(headers, key: bytes) -> str | None:
    """None if the headers carry the key (`Authorization: Bearer KEY` or `X-API-Key: KEY`), else why not."""
    given = headers.get("x-api-key")
    auth = headers.get("authorization") or ""
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not given:
        return "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"
    # The header's own bytes (HTTP servers hand headers over decoded as Latin-1) against the key's UTF-8: a key
    # beyond ASCII matched only when a client sent it in Latin-1. Constant time: no timing oracle on the key.
    if not hmac.compare_digest(given.encode("latin-1", "replace"), key):
        return "wrong API key"
    return None


def origin_problem(headers, allowed: tuple[str, ...] = ()) -> str | None:
    """None unless a browser sent the request from a page of another origin than the service's or `allowed`.
    Browsers send `Origin` with every cross-origin POST, those a page makes without a CORS preflight too (no
    Content-Type, text/plain); command-line and SDK clients send none."""
    origin = headers.get("origin")
    if origin is None or origin.rstrip("/") in allowed:
        return None
    if origin.split("://", 1)[-1].rstrip("/") != headers.get("host", ""):  # "null" (a sandboxed page, a file) too
        return (f"requests from web pages of another origin ({origin}) are refused; call the service from your backend, "
                "or start it with --allowed-origin")
    return None


def _host_name(host: str) -> str:
    """A Host header's name without its port: `[::1]:8000` -> `::1`, `example:80` -> `example`, a bare IPv6 as it is."""
    return host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_address(host: str) -> bool:
    """Whether a Host header names an IP address (with or without a port), not a DNS name."""
    try:
        ipaddress.ip_address(_host_name(host))
    except ValueError:
        return False
    return True


def host_problem(headers, allowed: tuple[str, ...] | None, fix: str = "start it with --allowed-host") -> str | None:
    """None if the Host header names this service (DNS rebinding: a page of evil.example, its name pointed at
    127.0.0.1, would otherwise be same-origin with a loopback service). `fix`: how this service takes other names."""
    if allowed is None:
        return None
    host = headers.get("host", "")
    return (None if _host_name(host).lower() in allowed else
            f"Host {host!r} is not this service's; address it as {allowed[0]} (or {fix})")


class GuardMiddleware:
    """Host (421) for every route (the probes', PROBE_PATHS, also answer an IP address); for /v1/ routes, before the body is parsed: the API key (401), a page of another
    origin (403), the content type (415), room for the request (429: bodies being read, queued and running are
    bounded, so a flood of slow clients cannot hold gigabytes of bodies) and the body's size (413) and time (408);
    and the request counter, so refusals made here are counted too."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics, body_timeout_s: float = 30.0,
                 max_connections: int = 256, allowed_hosts: tuple[str, ...] | None = None, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.in_flight = 0
        self.allowed_hosts = None if allowed_hosts is None else tuple(h.lower() for h in allowed_hosts)
        self.allowed_origins = tuple(o.rstrip("/") for o in allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        api = scope["path"].startswith("/v1/")
        if api:  # every /v1 answer names its request, refusals included
            rid = request_id(headers)
            scope.setdefault("state", {})["request_id"] = rid  # the route's request.state.request_id
            send = _with_request_id(send, rid)
        problem = host_problem(headers, self.allowed_hosts)
        if problem and scope["path"] in PROBE_PATHS and (_is_address(headers.get("host", "")) or "host" not in headers):
            problem = None  # a probe by address, or an HTTP/1.0 checker sending no Host (a browser always sends one)
        if problem:
            return await error_response(421, problem)(scope, receive, send)
        if not api:
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.in_flight >= self.max_connections:  # one event loop: no lock needed between the check and the count
            await error_response(429, f"{self.in_flight} requests are in flight, this service's limit; retry later",
                                 headers={"Retry-After": "1"})(scope, receive, send_and_record)
            if scope["path"] == GENERATE_PATH:
                self.metrics.observe_answer(429, time.perf_counter() - t0)
            return
        self.in_flight += 1
        try:
            if await self._guarded(scope, headers, receive, send_and_record) == "gone":
                status[0] = CLIENT_CLOSED_REQUEST  # hung up while sending its body: no answer, and not the service's failure
        finally:
            self.in_flight -= 1
            if scope["path"] == GENERATE_PATH:
                self.metrics.observe_answer(status[0], time.perf_counter() - t0)

    async def _guarded(self, scope, headers: dict[str, str], receive, send):
        if self.api_key is not None:
            problem = api_key_problem(headers, self.api_key)
            if problem:
                return await error_response(401, problem, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        problem = origin_problem(headers, self.allowed_origins)
        if problem:
            return await error_response(403, problem)(scope, receive, send)
        problem = content_type_problem(headers) if scope["method"] == "POST" else None
        if problem:
            return await error_response(415, problem)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(int(length), scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except asyncio.TimeoutError:
            return await error_response(408, f"the request body took more than {self.body_timeout_s:g} s to arrive; "
                                             "send it at once", headers={"Connection": "close"})(scope, receive, send)
        if body == "gone":
            return "gone"
        if isinstance(body, int):
            return await self._too_large(body, scope, receive, send)
        problem = body_text_problem(body) if scope["method"] == "POST" else None
        if problem:
            return await error_response(400, problem)(scope, receive, send)
        if scope["method"] == "POST" and scope["path"] == GENERATE_PATH:
            # Read off the event loop: a 16 MB body of a million unknown keys held the loop (and /healthz) 13 s in
            # FastAPI's parsing and pydantic's error list; one of more fields than a request has is refused here.
            problem = await asyncio.to_thread(body_fields_problem, body)
            if problem:
                return await error_response(422, problem)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | int | str:
        """The whole body, or its size once past the limit, or "gone" if the client hung up."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return "gone"
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return size
        return b"".join(chunks)

    async def _too_large(self, size: int, scope, receive, send):
        await too_large_response(size, self.max_body_bytes)(scope, receive, send)


def _with_request_id(send, rid: str):
    """ASGI `send` that puts X-Request-Id on the answer (in place of one a route set)."""
    value = rid.encode("latin-1")

    async def send_with_id(message):
        if message["type"] == "http.response.start":
            named = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            message = {**message, "headers": [*named, (b"x-request-id", value)]}
        await send(message)

    return send_with_id


# -- the app --------------------------------------------------------------------------------

def create_app(config: ServeConfig, runtime: ServeRuntime | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the runtime (load, warm-up, self-test in the worker)
    and, at shutdown, lets the worker finish every queued request."""
    runtime = runtime or ServeRuntime(config.runtime_config())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        yield
        await asyncio.to_thread(runtime.close, config.timeout_s + 5)

    # A body sent without a Content-Type is read as JSON (GuardMiddleware refuses only other declared types, as the
    # Ray route does); FastAPI from 0.12x leaves it unparsed unless told, and the client got a 422 about the body.
    lenient = {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(title="diffrt", summary="Diffusion inference over PyTorch, ONNX Runtime or TensorRT",
                  version=_version(), lifespan=lifespan, **lenient)
    app.state.runtime = runtime
    app.add_middleware(GuardMiddleware, api_key=config.api_key(), max_body_bytes=config.max_body_bytes, metrics=runtime.metrics,
                       body_timeout_s=config.body_timeout_s, allowed_hosts=config.allowed_hosts,
                       allowed_origins=tuple(config.allowed_origins),
                       max_connections=config.max_connections or 2 * (config.max_queue + config.max_batch_size))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        return request_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own refusals in diffrt's form: a 404, a 405, and a body json.loads cannot take (a number of
        # thousands of digits, nesting thousands deep), which FastAPI answers with a bare 400.
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = UNREADABLE_BODY
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.post(GENERATE_PATH, response_class=Response, responses={
        200: {"content": {"image/png": {}, "application/json": {}}, "description": "one PNG, or JSON with base64 PNGs and seeds"},
        **{code: {"description": text} for code, text in ((400, "malformed JSON"), (401, "missing or wrong API key"),
           (413, "body or image too large"), (422, "a field the schema or the loaded model refuses"), (429, "queue full"),
           (503, "not ready"), (504, "timed out"))}})
    async def generate(body: GenerateBody, request: Request) -> Response:
        """Generate images. Fields follow diffusers' names; leave one out for `diffrt generate`'s default."""
        try:
            answer = await answer_unless_gone(runtime.generate(body, request.state.request_id), request.receive)
        except asyncio.CancelledError:  # not its client (that is a 499): the server stopping without waiting (a second Ctrl-C)
            return error_response(503, "the service stopped before this request's images were made; retry", headers={"Retry-After": "1"})
        return answer_response(answer, request.headers.get("accept", ""))

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD: uptime checkers that read the status only
    async def healthz():
        if runtime.alive:
            return {"status": "ok"}
        return error_response(503, runtime.dead_reason)

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz():
        if runtime.ready:
            return {"ready": True, **runtime.describe()}
        reason = (f"the model failed to load: {runtime.error}" if runtime.error else runtime.dead_reason if runtime.loaded
                  else "loading")
        return JSONResponse({"ready": False, "detail": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(runtime.metrics.exposition(), media_type=runtime.metrics.content_type)

    return app


def _version() -> str:
    from diffrt import __version__

    return __version__


def uvicorn_config(app, config: ServeConfig):
    import uvicorn

    # No connection cap here: uvicorn's counts idle connections too (140 sockets that sent nothing made every route,
    # /healthz too, answer 503 for as long as they stayed open); GuardMiddleware bounds the /v1 requests instead.
    # Shutdown waits up to one request timeout for in-flight requests to finish.
    # h11, whose parser holds at most MAX_HEADER_BYTES of a request's head: httptools buffered a header that never
    # ended without a limit (ten clients sending 100 MiB each pinned 1 GB before any route or key was checked). A
    # diffusion request's parsing time is nothing beside its sampling.
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=int(config.timeout_s) + 5, http="h11",
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def serve(config: ServeConfig) -> None:
    """Run the service until SIGINT/SIGTERM; in-flight requests finish before it exits."""
    import uvicorn

    if config.host not in LOOPBACK and config.api_key() is None:
        log.warning("serving on %s without an API key; set %s to require one", config.host, config.api_key_env)
    check_port_free(config.host, config.port)  # before the model loads, not after
    from diffrt.export.lora import locate_lora

    for path, _ in config.loras:  # and the LoRA files, which the worker would find missing after uvicorn started
        locate_lora(Path(path))
    if config.allowed_hosts is None and config.host in LOOPBACK:  # reached as localhost only: no DNS rebinding
        config = dataclasses.replace(config, allowed_hosts=LOOPBACK_NAMES)
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config))
    failed: list[BaseException] = []

    def exit_if_the_model_fails_to_load() -> None:
        # /healthz answers while the model loads (a TensorRT build can take minutes); a model that
        # cannot load at all stops the process instead of serving 503s for ever.
        try:
            app.state.runtime.wait_ready(timeout=float("inf"))
        except BaseException as exc:  # noqa: BLE001 - any load failure ends the service
            failed.append(exc)
            server.should_exit = True

    threading.Thread(target=exit_if_the_model_fails_to_load, name="diffrt-serve-load-watch", daemon=True).start()
    run_server(server, app.state.runtime)
    if failed:
        error = failed[0]
        raise error if isinstance(error, DiffrtError) else DiffrtError(f"the model failed to load: {error}")


def run_server(server, runtime: ServeRuntime) -> None:
    """`server.run()`, then, after a forced stop (a second Ctrl-C: uvicorn skips the lifespan's shutdown and cancels
    the requests, whose rows are given up), wait for the worker to stop at its batch's next step: a process that ended
    under it, inside ONNX Runtime's or TensorRT's run, was aborted by the C++ runtime (exit status 134)."""
    try:
        server.run()  # in the main thread uvicorn raises the signals it caught once it stops: a KeyboardInterrupt here
    finally:
        if server.force_exit:
            log.warning("stopping without waiting for requests: their images are given up; the worker stops at its next step")
            if not runtime.close(timeout=60):
                log.warning("the worker did not stop within 60 s of a forced stop; exiting under it")


def check_port_free(host: str, port: int) -> int:
    """One line if nothing can listen on host:port, naming what to change: --host when the address is not this
    machine's (or no address at all), --port when another service holds it. Bound as uvicorn binds it
    (SO_REUSEADDR), so a port in TIME_WAIT is free; port 0 is probed too, for the address. Returns the port the
    probe bound: for 0, one that was free a moment ago (for a server that takes no 0, as Gradio's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
                raise DiffrtError(f"cannot listen on {host} ({exc.strerror or exc}): --host must be an address of this "
                                  "machine (127.0.0.1 for itself only, 0.0.0.0 for every interface)") from None
            raise DiffrtError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port, or stop the "
                              "process that holds it") from None
        return probe.getsockname()[1]


class BackgroundServer:
    """The real server in a background thread, for tests, benchmarks and notebooks.

        with BackgroundServer(ServeConfig(port=0)) as srv:
            httpx.post(srv.url + "/v1/generate", json={...})
    """

    def __init__(self, config: ServeConfig, ready_timeout: float = 120.0):
        import uvicorn

        self.config = config
        self.app = create_app(config)
        self.runtime: ServeRuntime = self.app.state.runtime
        self.server = uvicorn.Server(uvicorn_config(self.app, config))
        self.thread = threading.Thread(target=run_server, args=(self.server, self.runtime), name="diffrt-serve-http", daemon=True)
        self.ready_timeout = ready_timeout

    @property
    def url(self) -> str:
        (sock,) = self.server.servers[0].sockets[:1]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        self.runtime.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

