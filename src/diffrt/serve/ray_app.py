"""Ray Serve: the same runtime as `diffrt serve`, as autoscaled replicas behind one HTTP route.

    import ray
    from ray import serve
    from diffrt.serve.app import ServeConfig
    from diffrt.serve.ray_app import build_deployment

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_deployment(ServeConfig(), max_replicas=4), route_prefix="/v1/generate")

Diffusion is compute-bound and an engine's profile caps its batch, so throughput comes from
replicas: each replica is one `ServeRuntime` (one worker thread owning its pipeline, its own
batcher), Ray's proxy spreads requests over them, and the autoscaler adds replicas when the
ongoing requests per replica pass the engine's batch size. A replica asks for one GPU when the
cluster has one (`replica_gpus`; bind the deployment through `build_deployment`, whose options set
it: `DiffrtDeployment.bind` alone asks for none, and Ray hides the GPUs from such a replica). `check_health` raises once the replica's worker is dead, so Ray replaces it.

The route speaks the same API as `POST /v1/generate` of `diffrt serve` (schema, API key,
pages of other origins, Host names: loopback's for a config on loopback, the default, else those the
config lists; body limit, refusals, headers). A proxy other machines reach (http_options host
0.0.0.0) takes ServeConfig(host="0.0.0.0") or allowed_hosts, as `diffrt serve --host` would. A client that hangs up has its request given up as there: Ray's
proxy cancels the replica's call, the runtime drops its rows, and it counts as 499. Ray ships the
deployment to its workers with its own serialisation; diffrt passes it a plain dict of settings only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, fields, replace

import torch
from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from diffrt.serve.app import (CLIENT_CLOSED_REQUEST, LOOPBACK, LOOPBACK_NAMES, ServeConfig, answer_response, api_key_problem, content_type_problem,
                              error_response, host_problem, origin_problem, parse_body, request_error_response, request_id,
                              too_large_response, validation_error_response)
from diffrt.serve.runtime import ServeRuntime, setting_from_text
from diffrt.serve.schema import GenerateBody, RequestError

log = logging.getLogger(__name__)

@serve.deployment(
    name="diffrt",
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},  # build_deployment sets the GPU request
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
    max_ongoing_requests=16,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class DiffrtDeployment:
    """One replica: loads, warms up and self-tests its pipeline before it takes traffic."""

    def __init__(self, settings: dict, api_key: str | None = None):
        self.config = ServeConfig(**settings)
        # The driver's key (build_deployment): a replica on another node, or in a cluster started before the key was
        # set, does not inherit the driver's environment, and answered without asking for it.
        key = api_key or self.config.api_key()
        self.api_key = key.encode() if key else None
        # Ray's proxy binds where serve.start's http_options say, which the replica cannot read: as `diffrt serve`, a
        # config on loopback (the default) answers loopback names only (DNS rebinding: a page of evil.example, its
        # name pointed at 127.0.0.1, is same-origin with the route); a proxy others reach needs host or allowed_hosts.
        hosts = self.config.allowed_hosts
        if hosts is None and self.config.host in LOOPBACK:
            hosts = LOOPBACK_NAMES
        self.allowed_hosts = None if hosts is None else tuple(h.lower() for h in hosts)
        self.allowed_origins = tuple(o.rstrip("/") for o in self.config.allowed_origins)
        # The runtime's queue holds every request Ray lets in (max_ongoing_requests, deployment_for): overload is Ray's
        # proxy's answer alone (429 where Ray can say so), never a 429 from a replica that Ray thought had room (a
        # batch that does not fill, requests that cannot share one).
        self.runtime = ServeRuntime(replace(self.config.runtime_config(), max_queue=ongoing_requests(self.config)))
        self.runtime.start()
        # Raising here fails the replica; Ray reports and retries it. An hour, as Triton's model waits: a first
        # TensorRT build of a large model takes many minutes.
        self.runtime.wait_ready(timeout=3600)

    async def __call__(self, request: Request) -> Response:
        metrics, t0 = self.runtime.metrics, time.perf_counter()
        # Ray's proxy names every request (its RequestIdMiddleware: the client's X-Request-Id as sent, else its own) and
        # puts that header on the answer itself: the request goes by Ray's name here too (no header of diffrt's).
        rid = request.headers.get("x-request-id") or request_id(request.headers)
        try:
            response = await self._answer(request, rid)
        except asyncio.CancelledError:  # Ray's proxy cancels a request whose client hung up; the runtime gave its rows up
            metrics.observe_answer(CLIENT_CLOSED_REQUEST)
            raise
        except ClientDisconnect:  # hung up while sending its body: counted as `diffrt serve` counts it, no traceback
            metrics.observe_answer(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # to nobody
        metrics.observe_answer(response.status_code, time.perf_counter() - t0)
        return response

    async def _answer(self, request: Request, rid: str) -> Response:
        problem = host_problem(request.headers, self.allowed_hosts,  # the service's guard, in its order
                               "deploy it with ServeConfig(allowed_hosts=...), or host='0.0.0.0' for a proxy others reach")
        if problem:
            return error_response(421, problem)
        if self.api_key is not None:  # before the method, as the service's guard runs before its routes
            problem = api_key_problem(request.headers, self.api_key)
            if problem:
                return error_response(401, problem, headers={"WWW-Authenticate": "Bearer"})
        if request.method != "POST":
            return error_response(405, "Method Not Allowed", headers={"Allow": "POST"})  # as the service's route answers
        # A page of another site may POST a body with no Content-Type (no CORS preflight), which reads as JSON.
        problem = origin_problem(request.headers, self.allowed_origins)
        if problem:
            return error_response(403, problem)
        problem = content_type_problem(request.headers)  # as `diffrt serve`'s guard refuses it
        if problem:
            return error_response(415, problem)
        try:  # a sender that stops midway held a replica slot for as long as its socket stayed open
            chunks = await asyncio.wait_for(self._read_body(request), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            return error_response(408, f"the request body took more than {self.config.body_timeout_s:g} s to arrive; send it "
                                       "at once", headers={"Connection": "close"})  # the service's answer
        if isinstance(chunks, int):
            return too_large_response(chunks, self.config.max_body_bytes)
        if not any(chunks):
            return validation_error_response([{"type": "missing", "loc": (), "msg": "Field required"}])  # FastAPI's 422
        body = await asyncio.to_thread(parse_body, b"".join(chunks))  # off the replica's event loop, as the service
        if not isinstance(body, GenerateBody):
            return body  # the service's answer to a body it cannot read
        try:
            answer = await self.runtime.generate(body, rid)
        except RequestError as exc:
            return request_error_response(exc)
        return answer_response(answer, request.headers.get("accept", ""))

    async def _read_body(self, request: Request) -> list[bytes] | int:
        """The body's chunks, or the size read when it passed max_body_bytes (the read stops there)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return size
        return chunks

    def check_health(self) -> None:
        if not self.runtime.alive:
            raise RuntimeError(f"diffrt: {self.runtime.dead_reason}")

    def __del__(self) -> None:  # Ray's graceful shutdown: finish what is queued
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close(timeout=self.config.timeout_s + 5)


def replica_gpus(config: ServeConfig, num_gpus: float | None = None) -> float:
    """The GPUs one replica asks Ray for: `num_gpus` when given; none for `device="cpu"`, one for a CUDA device;
    else (the device left to the replica) one when the cluster has a GPU. The cluster's resources, not the driver's
    CUDA: a driver or head node without a GPU deployed every replica on CPU, and Ray hides the GPUs of a node from an
    actor that asked for none, so the replica could not have found them itself. A replica sees only the GPUs Ray gives
    it, numbered from cuda:0: a device of another number is refused."""
    device = torch.device(config.device) if config.device is not None else None
    if num_gpus is not None:
        if not 0 <= num_gpus:
            raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
        gpus = num_gpus
    elif device is not None:
        gpus = 0 if device.type == "cpu" else 1
    else:
        import ray

        if ray.is_initialized():
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        else:
            gpus = 1 if torch.cuda.is_available() else 0  # serve.run starts a local cluster on this machine
    if device is not None and device.type == "cuda" and (device.index or 0) >= max(1, math.ceil(gpus)):
        raise ValueError(f"device {config.device!r} names a GPU by number, and a replica sees only the GPUs Ray gives it, "
                         "from cuda:0: pass device='cuda'")
    return gpus


def deployment_for(config: ServeConfig, *, min_replicas: int = 1, max_replicas: int = 4, num_gpus: float | None = None):
    """The deployment, its options set (before `bind`): autoscaling on ongoing requests per replica, with the
    engine's batch size as the target (RELIABILITY's serving conventions), and the GPU request of `replica_gpus`."""
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas}, {max_replicas}")
    return DiffrtDeployment.options(
        ray_actor_options={"num_cpus": 1, "num_gpus": replica_gpus(config, num_gpus)},
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": config.max_batch_size},
        max_ongoing_requests=ongoing_requests(config),
        # Past those, requests wait at Ray's proxy, unbounded by default and outside the runtime's timeout: held to
        # max_queue there too, and refused past it as `diffrt serve` refuses a full queue (429, Retry-After).
        max_queued_requests=config.max_queue,
        **backpressure_options(),
        graceful_shutdown_timeout_s=config.timeout_s + 5,
    )


def ongoing_requests(config: ServeConfig) -> int:
    """The requests a replica takes at once (Ray's max_ongoing_requests): a full batch running and max_queue waiting.
    Its runtime's queue holds them all (DiffrtDeployment), whether or not they can share batches."""
    return config.max_batch_size + config.max_queue


def backpressure_options() -> dict:
    """Ray's answer to a request past its proxy's queue: 429 with Retry-After, as `diffrt serve` answers a full queue,
    where Ray can be told (BackpressureConfig, in newer Ray Serve); else Ray's own 503."""
    try:
        from ray.serve.config import BackpressureConfig
    except ImportError:
        return {}
    return {"backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1)}


def build_deployment(config: ServeConfig, *, min_replicas: int = 1, max_replicas: int = 4, num_gpus: float | None = None):
    """The bound application for `serve.run` (deployment_for's options); call it after `ray.init` when the cluster
    is not this machine, so that the GPU request reads the cluster's resources."""
    deployment = deployment_for(config, min_replicas=min_replicas, max_replicas=max_replicas, num_gpus=num_gpus)
    return deployment.bind(asdict(config), api_key=config.api_key())


def app(args: dict):
    """An application builder for Ray's own deploy paths: `serve run diffrt.serve.ray_app:app model=runs/sd-trt
    backend=tensorrt max_replicas=4`, or a Serve config file (`import_path: diffrt.serve.ray_app:app`, with `args`).
    `args` are ServeConfig's fields, and build_deployment's min_replicas, max_replicas and num_gpus; given on `serve
    run`'s command line they arrive as text, and are read as the field's type."""
    args = dict(args)
    builder = {name: args.pop(name) for name in ("min_replicas", "max_replicas", "num_gpus") if name in args}
    types = {f.name: type(f.default) for f in fields(ServeConfig)} | {"max_connections": int, "loras": list, "allowed_hosts": tuple,
                                                                     "controlnet": list}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} for diffrt's Ray application; its arguments are ServeConfig's "
                         f"fields ({', '.join(types)}) and min_replicas, max_replicas, num_gpus")
    settings = {name: _typed(name, value, types[name]) for name, value in args.items()}
    if isinstance(settings.get("controlnet"), tuple):
        settings["controlnet"] = list(settings["controlnet"])
    kinds = {"min_replicas": int, "max_replicas": int, "num_gpus": float}
    if "device" not in settings and "num_gpus" not in builder:
        import ray

        if not ray.is_initialized():  # `serve run` builds the application before it connects to the cluster
            log.warning("the replicas' GPU request is decided by this machine's CUDA (%s GPU), not the cluster's, "
                        "which `serve run` has not connected to yet: pass num_gpus=1 (or device=cuda) for GPU replicas, "
                        "device=cpu for none", "a" if torch.cuda.is_available() else "no")
    return build_deployment(ServeConfig(**settings), **{name: _typed(name, value, kinds[name]) for name, value in builder.items()})


def _typed(name: str, value, kind: type):
    """A builder argument as its field's type: `serve run` passes key=value pairs as text."""
    if not isinstance(value, str) or kind in (str, type(None)):
        return value
    if name == "loras":
        raise ValueError("loras: give them in a Serve config file's args, as a list of [file, scale] pairs")
    if kind in (tuple, list):  # allowed_hosts, allowed_origins, controlnet: comma-separated
        return tuple(part.strip() for part in value.split(",") if part.strip())
    try:
        return setting_from_text(value, kind)
    except ValueError:
        raise ValueError(f"{name}={value!r}: " + ("true or false" if kind is bool else
                                                  f"not a{'n' if kind is int else ''} {kind.__name__}")) from None
