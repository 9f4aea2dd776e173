"""Prometheus metrics of one service, on its own CollectorRegistry.

A registry per service (not prometheus_client's global one) lets several services live in one
process (tests, the Gradio demo beside the HTTP app) without "Duplicated timeseries" errors.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("diffrt_serve_requests", "Generation requests answered, by HTTP status "
                                "(499: the client hung up first and its request was given up)", ["status"], registry=r)
        self.latency = Histogram("diffrt_serve_request_seconds", "End-to-end latency of successful generation requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("diffrt_serve_stage_seconds", "Time per stage of a request: queue wait, DDIM sampling "
                               "(and within it each component: text_encoder, unet x N steps, vae_decoder, ...), PNG encoding",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("diffrt_serve_queue_depth", "Requests waiting for the worker", registry=r)
        self.batch_size = Histogram("diffrt_serve_batch_size", "Images per batch run by the worker", buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("diffrt_serve_images_generated", "Images generated and returned", registry=r)
        self.nonfinite = Counter("diffrt_serve_nonfinite", "Requests refused because the model produced NaN/inf for them (a "
                                 "batch that did is run again request by request: only those that fail alone count)", registry=r)
        self.backend = Info("diffrt_serve_backend", "The backend that runs the model (RELIABILITY #15), the model and device", registry=r)
        self.ready = Gauge("diffrt_serve_ready", "1 once the model is loaded, warmed up and self-tested", registry=r)
        self.profile_rejections = Counter("diffrt_serve_profile_rejections", "Requests refused because a size falls outside "
                                          "the engine's built ranges (RELIABILITY #3), by field", ["field"], registry=r)
        self.fallbacks = Gauge("diffrt_serve_provider_fallbacks", "Components whose ONNX Runtime session runs without a "
                               "provider that was asked for (RELIABILITY #15; --strict refuses to start instead)", registry=r)
        self.torch_fallbacks = Gauge("diffrt_serve_torch_fallbacks", "Components of an exported model that run on eager "
                                     "PyTorch instead: the VAE encoder of an artifact exported without --vae-encoder "
                                     "(RELIABILITY #15; --strict refuses to start instead)", registry=r)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def observe_answer(self, status: int, seconds: float | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        if status == 200 and seconds is not None:
            self.latency.observe(seconds)

    def observe_timings(self, timings_ms: dict[str, float], images: int) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(stage=stage).observe(ms / 1000)
        self.images.inc(images)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
