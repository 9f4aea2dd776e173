"""`diffrt serve`, the Gradio demo and the Ray Serve deployment, against the real server.

The HTTP tests start uvicorn in a thread on 127.0.0.1 (a free port) over ONNX Runtime, the
backend `diffrt serve` uses by default, and talk to it with httpx:

* an image over HTTP has the pixels `diffrt generate` writes for the same seed and settings;
* under load (60 requests from 8 client threads) every answer is its own seed's solo image or
  a 429, none is lost, and /metrics counts them all (RELIABILITY #14, #18);
* requests with eta > 0, or with colour guidance toward different colours at one scale, share a
  batch, and each answer is still the images `diffrt generate` writes for that request;
* each kind of bad request gets its 4xx with a message naming the problem, and the server
  keeps serving; the backend that ran is reported (RELIABILITY #15).

The shipped digits model is used when it is present, else a tiny random class-conditioned one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import serving  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.generate import DEFAULT_PIXEL_GUIDANCE_SCALE, GenerateRequest, generate  # noqa: E402
from diffrt.images import png_bytes  # noqa: E402
from diffrt.models import SHIPPED_DIGITS  # noqa: E402
from diffrt.serve.app import BackgroundServer, ServeConfig  # noqa: E402
from diffrt.serve.batcher import Batcher, ClosedError, Job, QueueFullError  # noqa: E402
from diffrt.serve.batching import BatchAbandoned  # noqa: E402

API_KEY_ENV = "DIFFRT_TEST_SERVE_KEY"
API_KEY = "test-key-5f2c"
STEPS = 5  # few DDIM steps: these tests are about the service, not the images


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def served_model(request, tmp_path_factory) -> str | None:
    """What `--model` names: None for the shipped digits model when it is there (exported to
    ONNX in the user cache, as `diffrt serve` does), else a tiny model exported to a tmp folder."""
    if (SHIPPED_DIGITS / "model_index.json").is_file():
        return None
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    src = request.getfixturevalue("classemb_model_dir")
    out = tmp_path_factory.mktemp("serve_artifact") / "artifact"
    export_pixel_model(src, out, ExportOptions(backend="onnx", verify=False))
    return str(out)


@pytest.fixture(scope="module")
def pipe(served_model):
    """A second pipeline over the same model, for solo reference images."""
    from diffrt.runtime.loading import open_pixel_pipeline

    return open_pixel_pipeline(served_model, "onnxruntime", "cpu")


@pytest.fixture(scope="module")
def server(served_model):
    os.environ[API_KEY_ENV] = API_KEY
    config = ServeConfig(model=served_model, backend="onnxruntime", port=0, api_key_env=API_KEY_ENV, max_batch_size=8,
                         max_queue=8, batch_wait_ms=20, timeout_s=60, device="cpu", max_body_bytes=16 << 20,
                         max_image_bytes=8 << 20, log_level="warning")
    with BackgroundServer(config) as srv:
        yield srv
    os.environ.pop(API_KEY_ENV, None)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def solo(pipe, label: int, seed: int, **kwargs) -> np.ndarray:
    """The request run alone: what `diffrt generate` does, as PNG pixels."""
    scale = kwargs.pop("guidance_scale", DEFAULT_PIXEL_GUIDANCE_SCALE)
    result = pipe([label], num_inference_steps=STEPS, guidance_scale=scale, seed=seed,
                  output_type="pt", **kwargs)
    return pixels(png_bytes(result.images[0]))


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:{{{re.escape(want)}}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


# -- the pipeline's `latents=` (the one change outside serve/) --------------------------------

def test_pipeline_latents_equal_seeded_noise(pipe):
    from diffrt.runtime.sampling import randn

    shape = (2, pipe.channels, pipe.sample_size, pipe.sample_size)
    latents = randn(shape, torch.Generator("cpu").manual_seed(11), torch.device("cpu"), torch.float32)
    by_seed = pipe([1, 2], num_inference_steps=3, guidance_scale=2.0, seed=11, output_type="pt").images
    by_latents = pipe([1, 2], num_inference_steps=3, guidance_scale=2.0, latents=latents, output_type="pt").images
    assert torch.equal(by_seed, by_latents)
    with pytest.raises(DiffrtError, match="latents must have shape"):
        pipe([1], num_inference_steps=1, latents=latents)


# -- the batcher alone -----------------------------------------------------------------------

def test_batcher_groups_by_key_and_matches_answers_by_id():
    seen: list[list[str]] = []

    def run(jobs):
        seen.append([j.payload for j in jobs])
        return {j.id: f"answer:{j.payload}" for j in reversed(jobs)}  # order must not matter

    gate = threading.Event()
    batcher = Batcher(run, max_batch_size=3, max_queue=10, wait_s=0.05, on_start=lambda: gate.wait(5))
    batcher.start()
    jobs = [Job(key, 1, name, deadline=time.monotonic() + 10) for key, name in
            [("a", "a1"), ("b", "b1"), ("a", "a2"), (None, "solo"), ("a", "a3"), ("a", "a4")]]
    for job in jobs:
        batcher.submit(job)
    gate.set()
    assert [job.future.result(5) for job in jobs] == [f"answer:{job.payload}" for job in jobs]
    assert seen == [["a1", "a2", "a3"], ["b1"], ["solo"], ["a4"]]
    assert batcher.close(5)
    with pytest.raises(ClosedError):
        batcher.submit(Job("a", 1, "late", deadline=time.monotonic() + 10))


def test_batcher_refuses_when_full_and_skips_cancelled():
    gate, ran = threading.Event(), []
    batcher = Batcher(lambda jobs: ran.extend(j.payload for j in jobs) or {j.id: 1 for j in jobs},
                      max_batch_size=4, max_queue=2, wait_s=0.0, on_start=lambda: gate.wait(5))
    batcher.start()
    first, second = (Job(None, 1, n, deadline=time.monotonic() + 10) for n in ("first", "second"))
    batcher.submit(first)
    batcher.submit(second)
    with pytest.raises(QueueFullError):
        batcher.submit(Job(None, 1, "third", deadline=time.monotonic() + 10))
    second.future.cancel()  # its client gave up while it waited (and got its 504)
    assert batcher.depth == 1
    batcher.check_room()  # its slot is free again: no QueueFullError
    third = Job(None, 1, "third", deadline=time.monotonic() + 10)
    batcher.submit(third)
    gate.set()
    assert first.future.result(5) == 1 and third.future.result(5) == 1
    assert batcher.close(5)
    assert ran == ["first", "third"]


def test_batcher_reports_a_worker_that_fails_to_start():
    batcher = Batcher(lambda jobs: {}, max_batch_size=1, max_queue=1, wait_s=0, on_start=lambda: 1 / 0)
    batcher.start()
    assert batcher.close(5)
    assert not batcher.alive and isinstance(batcher.error, ZeroDivisionError)


@pytest.mark.parametrize("exact", [True, False])
def test_batches_that_differ_from_requests_alone_are_not_batched_unless_allowed(exact):
    """The start-up probe (RELIABILITY #18): a backend whose images depend on the batch they are in (cuDNN and TensorRT
    pick kernels by batch size) measures the difference, and then runs requests one at a time unless told a
    last-bit difference is acceptable; a batch-invariant one batches. The real server on ONNX Runtime measures 0."""
    from diffrt.serve.batching import BatchingWorker

    base = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    class Worker(BatchingWorker):
        def __init__(self, run):
            self.max_batch_size, self.exact_batching, self.run = 8, exact, run

        def probe_batch(self, n):
            return self.run

    class Plan:
        def batch_key(self):
            return ("same settings",)

    invariant = Worker(lambda rows: base[rows])
    invariant.settle_batching("a backend", fits=4)
    assert invariant.max_batch_size == 4 and invariant.batch_max_abs_diff == 0.0
    assert invariant.batches_requests and invariant.batch_key(Plan()) == ("same settings",)

    varying = Worker(lambda rows: base[rows] + 1e-6 * len(rows))  # the last bits move with the batch's size
    varying.settle_batching("a backend", fits=8)
    assert varying.batch_max_abs_diff == pytest.approx(7e-6, rel=1e-2)  # 8 rows batched against 1 alone
    assert varying.batches_requests is (not exact) and (varying.batch_key(Plan()) is None) is exact


# -- the real server --------------------------------------------------------------------------

def test_health_ready_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["backend"] == "onnxruntime" and ready["warmup_seconds"] > 0
    # ONNX Runtime's CPU kernels are batch-invariant: the start-up probe finds batched == alone, bit for bit.
    assert ready["batch_max_abs_diff"] == 0.0 and ready["batches_requests"] is True
    spec = client.get("/openapi.json").json()
    assert "/v1/generate" in spec["paths"]
    assert "num_inference_steps" in spec["components"]["schemas"]["GenerateBody"]["properties"]


def test_http_pixels_equal_diffrt_generate(client, served_model):
    label = 3
    # One image: the PNG body, with colour guidance and eta > 0.
    settings = dict(seed=1234, num_inference_steps=STEPS, guidance_scale=2.5, eta=0.5, color="#ff8800", color_scale=4.0)
    r = client.post("/v1/generate", json={"class_label": label, **settings})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-diffrt-backend"] == "onnxruntime"  # RELIABILITY #15
    assert r.headers["x-diffrt-seed"] == "1234" and "sample;dur=" in r.headers["server-timing"]
    ref = generate(GenerateRequest(model=served_model, backend="onnxruntime", class_label=label, **settings))
    assert ref.backend == "onnxruntime"
    assert np.array_equal(pixels(r.content), pixels(png_bytes(ref.images[0])))

    # Two images from one seed: JSON, the same as `diffrt generate --num-images 2`.
    r = client.post("/v1/generate", json={"class_label": label, "seed": 99, "num_inference_steps": STEPS, "num_images": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["backend"] == "onnxruntime" and out["seed"] == 99 and [im["seed"] for im in out["images"]] == [99, 99]
    # Latency per stage: the UNet's calls are timed in place, a part of the sampling loop's time.
    assert 0 < out["timings_ms"]["unet"] <= out["timings_ms"]["sample"]
    ref = generate(GenerateRequest(model=served_model, backend="onnxruntime", class_label=label, seed=99,
                                   num_inference_steps=STEPS, num_images=2))
    for image, want in zip(out["images"], ref.images):
        assert np.array_equal(pixels(base64.b64decode(image["png_base64"])), pixels(png_bytes(want)))


def test_load_each_answer_is_its_own_seed(client, server, pipe):
    n_classes = pipe.info.num_classes
    before = client.get("/metrics").text
    requests = [(i % n_classes, 1000 + i) for i in range(60)]
    results: dict[int, tuple[int, bytes, str]] = {}

    def one(i: int) -> None:
        label, seed = requests[i]
        r = client.post("/v1/generate", json={"class_label": label, "seed": seed, "num_inference_steps": STEPS},
                        timeout=60)
        results[i] = (r.status_code, r.content, r.headers.get("x-diffrt-batch-size", "0"))

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(len(requests)), timeout=120))
    assert time.monotonic() - t0 < 120
    assert sorted(results) == list(range(60))  # none lost, none hung
    statuses = [status for status, _, _ in results.values()]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 30
    for i, (status, content, _) in results.items():
        if status == 200:
            label, seed = requests[i]
            assert np.array_equal(pixels(content), solo(pipe, label, seed)), f"request {i} (seed {seed}) got another image"
    assert max(int(b) for s, _, b in results.values() if s == 200) > 1  # requests did share batches

    after = client.get("/metrics").text
    for status in (200, 429):
        delta = metric(after, "diffrt_serve_requests_total", status=status) - metric(before, "diffrt_serve_requests_total", status=status)
        assert delta == statuses.count(status)
    batches = metric(after, "diffrt_serve_batch_size_count") - metric(before, "diffrt_serve_batch_size_count")
    singles = metric(after, "diffrt_serve_batch_size_bucket", le="1.0") - metric(before, "diffrt_serve_batch_size_bucket", le="1.0")
    assert batches - singles > 0  # some batches held more than one image
    images = metric(after, "diffrt_serve_images_generated_total") - metric(before, "diffrt_serve_images_generated_total")
    assert images == statuses.count(200)
    assert metric(after, "diffrt_serve_backend_info", backend="onnxruntime", device="cpu",
                  model=str(server.config.model or "shipped:digits")) == 1


def queued_together(server, client, bodies: list[dict]) -> list[httpx.Response]:
    """serving.queued_together, held on a request whose guidance scale none of the bodies has."""
    return serving.queued_together(server, client, bodies, blocker={"class_label": 0, "seed": 0, "guidance_scale": 1.5}, steps=STEPS)


def answer_images(response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [pixels(base64.b64decode(image["png_base64"])) for image in response.json()["images"]]


def generated(served_model, body: dict) -> list[np.ndarray]:
    """What `diffrt generate` writes for the request's seed and settings."""
    fields = {k: v for k, v in body.items() if k != "seed"}
    ref = generate(GenerateRequest(model=served_model, backend="onnxruntime", device="cpu", num_inference_steps=STEPS,
                                   seed=body["seed"], **fields))
    return [pixels(png_bytes(image)) for image in ref.images]


def test_eta_requests_share_a_batch_each_with_its_own_noise(server, client, served_model):
    """eta > 0 with distinct seeds and image counts: one batch, each request's rows of every step's
    noise drawn from its own seed's generator, so each answer is its `diffrt generate` images."""
    assert server.runtime.worker.max_batch_size >= 5
    bodies = [{"class_label": 1, "seed": 70, "eta": 0.6, "num_images": 2}, {"class_label": 2, "seed": 71, "eta": 0.6},
              {"class_label": 3, "seed": 72, "eta": 0.6, "num_images": 2}, {"class_label": 3, "seed": 72, "eta": 0.3}]
    before = client.get("/metrics").text
    responses = queued_together(server, client, bodies)
    answers = [r.json() for r in responses if r.status_code == 200]
    assert [a["batch_size"] for a in answers] == [5, 5, 5, 1]  # equal eta shares; another eta runs apart
    for body, response in zip(bodies, responses):
        got, want = answer_images(response), generated(served_model, body)
        assert len(got) == len(want) == body.get("num_images", 1)
        for image, ref in zip(got, want):
            np.testing.assert_array_equal(image, ref, err_msg=str(body))
    assert not np.array_equal(answer_images(responses[2])[0], answer_images(responses[3])[0])  # eta reached the sampler
    after = client.get("/metrics").text
    images = metric(after, "diffrt_serve_batch_size_sum") - metric(before, "diffrt_serve_batch_size_sum")
    batches = metric(after, "diffrt_serve_batch_size_count") - metric(before, "diffrt_serve_batch_size_count")
    assert (images, batches) == (5 + 1 + 1, 3)  # the eta batch, the other eta, the request that held the worker


def test_lcm_requests_share_a_batch_apart_from_ddim_each_its_own_noise(server, client, served_model):
    """`scheduler: "lcm"` on this DDIM model: LCM requests share a batch, each drawing the noise LCM adds between
    steps from its own seed's generator; DDIM ones (the model's own, left out or named) batch apart; every answer
    is its `diffrt generate --scheduler` images."""
    bodies = [{"class_label": 1, "seed": 90, "scheduler": "lcm", "num_images": 2}, {"class_label": 2, "seed": 91},
              {"class_label": 3, "seed": 92, "scheduler": "lcm"}, {"class_label": 4, "seed": 93, "scheduler": "ddim"}]
    responses = queued_together(server, client, bodies)
    assert [r.json()["batch_size"] for r in responses] == [3, 2, 3, 2]
    for body, response in zip(bodies, responses):
        for image, ref in zip(answer_images(response), generated(served_model, body), strict=True):
            np.testing.assert_array_equal(image, ref, err_msg=str(body))
    assert client.get("/readyz").json()["scheduler"] == "ddim"  # the model's own, what a request leaving it out gets


def test_colour_requests_at_one_scale_share_a_batch(server, client, served_model):
    """Colour guidance toward different colours at one scale: one batch, each image row pulled
    toward its own request's colour; a plain request and another scale run apart."""
    bodies = [{"class_label": 1, "seed": 80, "color": "#ff0000", "color_scale": 4.0},
              {"class_label": 2, "seed": 81},
              {"class_label": 2, "seed": 82, "color": "#00ff88", "color_scale": 4.0, "num_images": 2},
              {"class_label": 3, "seed": 83, "color": "#2040c0", "color_scale": 4.0, "eta": 0.0},
              {"class_label": 3, "seed": 83, "color": "#2040c0", "color_scale": 8.0}]
    responses = queued_together(server, client, bodies)
    assert [r.json()["batch_size"] for r in responses] == [4, 1, 4, 4, 1]
    for body, response in zip(bodies, responses):
        for image, ref in zip(answer_images(response), generated(served_model, body), strict=True):
            np.testing.assert_array_equal(image, ref, err_msg=str(body))
    assert not np.array_equal(answer_images(responses[3])[0], answer_images(responses[4])[0])  # the scale reached the loss


@pytest.mark.parametrize("body, status, names", [
    (b'{"class_label": 1,', 400, "not valid JSON"),
    (b'{"class_label": 1, "num_inference_step": 5}', 422, "num_inference_step: unknown field"),
    (b'{"class_label": 1, "num_inference_steps": -3}', 422, "num_inference_steps"),
    (b'{"class_label": 1, "num_inference_steps": 100000}', 422, "num_inference_steps"),
    (b'{"class_label": 1, "num_inference_steps": "5"}', 422, "num_inference_steps"),
    (b'{"class_label": 1, "color": "orange"}', 422, "color"),
    (b'{"class_label": 1, "prompt": "a cat"}', 422, "prompt: the loaded model is a class-conditioned pixel-space model"),
    (b'{"class_label": 1, "strength": 0.5}', 422, "strength: the loaded model is a class-conditioned pixel-space model"),
    (b'{"class_label": 1, "guidance_rescale": 0.5}', 422, "guidance_rescale: the loaded model is a class-conditioned pixel-space"),
    (b'{"class_label": 1, "clip_skip": 1}', 422, "clip_skip: the loaded model is a class-conditioned pixel-space"),
    (b'{"class_label": 1, "control_guidance_end": 0.5}', 422, "control_guidance_end: the loaded model is a class-conditioned"),
    (b'{"class_label": 1, "lora_scale": 0.5}', 422, "lora_scale: lora_scale 0.5: this model runs no LoRA"),
    (b'{"class_label": 100}', 422, "class_label: 100 is out of range"),
    (b'{"class_label": 1, "scheduler": "heun"}', 422, "scheduler: Input should be 'ddim', 'lcm', 'dpm', 'euler' or 'euler_a'"),
    (b'{"class_label": 1, "scheduler": "lcm", "eta": 0.5}', 422, "eta: eta 0.5 is DDIM's; LCM draws fresh noise"),
    (b'{"class_label": 1, "scheduler": "lcm", "num_inference_steps": 51}', 422, "num_inference_steps: LCM takes its steps"),
    (b'{"num_inference_steps": 2}', 422, "class_label: required"),
    (b'{"class_label": 1, "height": 24}', 422, "height"),
    (b'{"class_label": 1, "num_images": 9}', 422, "num_images: 9 is more than this service's largest batch (8)"),
    (b'[]', 422, "body"),
])
def test_bad_requests_are_refused_by_name(client, body, status, names):
    r = client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert names in r.json()["detail"]
    assert client.post("/v1/generate", json={"class_label": 1, "seed": 5, "num_inference_steps": 1}).status_code == 200


def test_every_answer_carries_the_request_id_its_client_sent(client, server, pipe):
    """From a review: the service replaced a client's (or its proxy's) X-Request-Id with an id of its own and sent none
    with a refusal, so neither could be matched to the service's answers and log lines."""
    from concurrent.futures import ThreadPoolExecutor

    ok = {"class_label": 1, "seed": 5, "num_inference_steps": 1}
    r = client.post("/v1/generate", json=ok, headers={"X-Request-Id": "my-req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req-42"
    r = client.post("/v1/generate", json={**ok, "num_images": 2}, headers={"X-Request-Id": "my-req-43"})
    assert r.status_code == 200 and r.json()["id"] == r.headers["x-request-id"] == "my-req-43"
    refused = client.post("/v1/generate", json={"class_label": 100}, headers={"X-Request-Id": "bad-1"})
    assert refused.status_code == 422 and refused.headers["x-request-id"] == "bad-1"
    keyless = httpx.post(f"{server.url}/v1/generate", json=ok, headers={"X-Request-Id": "no-key-1"}, timeout=60)
    assert keyless.status_code == 401 and keyless.headers["x-request-id"] == "no-key-1"
    # None sent, or one a header or a log line would not carry as it is: a new one.
    fresh = [client.post("/v1/generate", json=ok, headers=sent).headers["x-request-id"]
             for sent in ({}, {"X-Request-Id": "has space"}, {"X-Request-Id": "x" * 129})]
    assert all(re.fullmatch("[0-9a-f]{32}", rid) for rid in fresh) and len(set(fresh)) == 3
    # Two requests under one id (a client's retry) in one batch: each gets its own images all the same.
    bodies = [{"class_label": 2, "seed": seed, "num_inference_steps": STEPS} for seed in (11, 12)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/generate", json=b, headers={"X-Request-Id": "retry"}), bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "retry"
        assert np.array_equal(pixels(answer.content), solo(pipe, 2, body["seed"]))


def test_duplicate_keys_a_scale_without_its_colour_and_accept_q0_are_taken_as_meant(client, server):
    """From the second serve review: a key named twice was last-wins, and let a 14 MB body of one repeated key past the
    field counts onto the event loop; color_scale without color gave unguided images (`diffrt generate` refuses it);
    `Accept: application/json;q=0` (JSON refused) got JSON."""
    r = client.post("/v1/generate", content=b'{"class_label": 3, "seed": 1, "class_label": 4}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "names 'class_label' more than once" in r.json()["detail"], r.text
    r = client.post("/v1/generate", json={"class_label": 1, "color_scale": 5.0, "num_inference_steps": 1})
    assert r.status_code == 422 and r.json()["field"] == "color_scale" and "no color was given" in r.json()["detail"]
    from diffrt.serve.schema import DEFAULT_COLOR_SCALE  # the default itself: clients that send every field send it

    assert client.post("/v1/generate", json={"class_label": 1, "color_scale": DEFAULT_COLOR_SCALE, "num_inference_steps": 1}).status_code == 200
    body = {"class_label": 1, "seed": 3, "num_inference_steps": 1}
    r = client.post("/v1/generate", json=body, headers={"Accept": "image/png, application/json;q=0"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    r = client.post("/v1/generate", json=body, headers={"Accept": "image/png;q=0.5, application/json;q=0.9"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    # Uptime checkers: HEAD, and an HTTP/1.0 request with no Host (a browser always sends one).
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200


def test_an_api_key_beyond_ascii_matches_as_its_client_sends_it():
    """HTTP servers hand headers over decoded as Latin-1: a UTF-8 key sent as UTF-8 (as curl and httpx send it) was
    'wrong', the same key sent in Latin-1 right."""
    from diffrt.serve.app import api_key_problem

    key = "clé-secrète"
    as_sent = key.encode("utf-8").decode("latin-1")  # what the server reads from the UTF-8 bytes on the wire
    assert api_key_problem({"x-api-key": as_sent}, key.encode()) is None
    assert api_key_problem({"authorization": "Bearer " + as_sent}, key.encode()) is None
    assert api_key_problem({"x-api-key": key}, key.encode()) == "wrong API key"  # Latin-1 bytes on the wire


def test_profile_rejections_and_provider_fallbacks_are_metrics(client):
    # RELIABILITY #3 and #15 as an operator sees them: sizes outside the engine's ranges are counted
    # by field (other 422s are not), and no component of this CPU service fell back.
    before = client.get("/metrics").text
    # num_images 9: past the operator's --max-batch-size 8, within the engine's batches: not a profile rejection.
    for body in ({"class_label": 1, "height": 24}, {"class_label": 1, "num_images": 64}, {"class_label": 100},
                 {"class_label": 1, "num_images": 9}):
        assert client.post("/v1/generate", json=body).status_code == 422
    after = client.get("/metrics").text
    for field, count in (("height", 1), ("num_images", 1), ("class_label", 0)):
        delta = (metric(after, "diffrt_serve_profile_rejections_total", field=field)
                 - metric(before, "diffrt_serve_profile_rejections_total", field=field))
        assert delta == count, field
    assert re.search(r"^diffrt_serve_provider_fallbacks 0\.0$", after, re.M)


def test_oversized_bodies_images_and_wrong_keys(client, server):
    url = server.url + "/v1/generate"
    ok = {"class_label": 1, "seed": 5, "num_inference_steps": 1}
    big = base64.b64encode(os.urandom(15 << 20)).decode()  # 20 MB of base64: over the 16 MiB body limit
    r = client.post("/v1/generate", json={**ok, "control_image": big})
    assert r.status_code == 413 and "request body" in r.json()["detail"]
    # Under the body limit, over the image limit, in a field this pixel model does not take: that is what it is told
    # (the image limit: test_serve_t2i.py).
    r = client.post("/v1/generate", json={**ok, "control_image": big[: 12 << 20]})
    assert r.status_code == 422 and r.json()["field"] == "control_image" and "needs a ControlNet model" in r.json()["detail"]
    r = client.post("/v1/generate", content=b"class_label=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    for headers, message in (({}, "missing API key"), ({"Authorization": "Bearer nope"}, "wrong API key"),
                             ({"X-API-Key": "nope"}, "wrong API key")):
        r = httpx.post(url, json=ok, headers=headers, timeout=30)
        assert r.status_code == 401 and message in r.json()["detail"]
    assert httpx.post(url, json=ok, headers={"X-API-Key": API_KEY}, timeout=30).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_queue_full_is_429_and_timeout_is_504(client, server):
    runtime, batcher, max_queue = server.runtime, server.runtime.batcher, server.config.max_queue
    original, gate = batcher.run_batch, threading.Event()
    batcher.run_batch = lambda jobs: gate.wait(30) and original(jobs)  # stall the worker
    body = {"class_label": 2, "num_inference_steps": 1}

    def post(i: int) -> httpx.Response:  # each its own eta: no two share a batch
        return client.post("/v1/generate", json={**body, "seed": i, "eta": 0.5 + i / 100})

    try:
        with ThreadPoolExecutor(max_workers=max_queue + 1) as pool:
            held = pool.submit(post, 0)
            serving.wait_until(lambda: batcher.in_flight == 1 and batcher.depth == 0, "the first request to hold the worker")
            queued = [pool.submit(post, i) for i in range(1, max_queue + 1)]
            serving.wait_until(lambda: batcher.in_flight == max_queue + 1 and batcher.depth == max_queue, "the queue to fill")
            refused = client.post("/v1/generate", json={**body, "seed": 99, "eta": 0.9})
            gate.set()
            codes = [f.result(60).status_code for f in [held, *queued]]
    finally:
        gate.set()
        batcher.run_batch = original
    assert refused.status_code == 429 and "queue is full" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert codes == [200] * (max_queue + 1)  # every request the queue took is answered

    # The worker is held past the request's timeout: the client gets a 504, and the batch, let go
    # once nobody waits for it, stops after its first step instead of running all 200.
    release, abandoned = threading.Event(), []

    def held_past_timeout(jobs):
        release.wait(30)
        try:
            return original(jobs)
        except BatchAbandoned as exc:
            abandoned.append(str(exc))
            raise

    batcher.run_batch = held_past_timeout
    runtime.config.timeout_s = 0.3
    try:
        r = client.post("/v1/generate", json={"class_label": 2, "seed": 1, "num_inference_steps": 200})
    finally:
        runtime.config.timeout_s = 60
        release.set()
    try:
        assert r.status_code == 504 and "timeout" in r.json()["detail"]
        r = client.post("/v1/generate", json={"class_label": 2, "seed": 1, "num_inference_steps": 1},
                        headers={"Accept": "application/json"})
    finally:
        batcher.run_batch = original
    assert r.status_code == 200, r.text
    assert abandoned == ["every request of this batch timed out by step 0"]  # the worker ran it before this one
    # Its UNet time is its own one step, not also the abandoned batch's step.
    assert 0 < r.json()["timings_ms"]["unet"] <= r.json()["timings_ms"]["sample"]


def slow_body(seed: int) -> dict:
    """A request of the most steps the schema takes, with its own eta so that it runs in a batch of its own."""
    return {"class_label": 1, "seed": seed, "num_inference_steps": 200, "eta": 0.5 + seed / 100}


def recording_batches(batcher, hold_first: threading.Event | None = None):
    """Wrap the worker's run_batch: each batch's seeds and whether it was answered or abandoned, in
    the order the worker ran them; the first batch waits for `hold_first` before it samples."""
    original, ran = batcher.run_batch, []

    def run(jobs):
        seeds = [job.payload.seed for job in jobs]
        if hold_first is not None and not ran:
            hold_first.wait(30)
        try:
            answers = original(jobs)
        except BatchAbandoned:
            ran.append((seeds, "abandoned"))
            raise
        ran.append((seeds, "answered"))
        return answers

    batcher.run_batch = run
    return original, ran


def test_a_client_that_hangs_up_has_its_request_given_up(client, server):
    """Three clients send a slow request (200 steps) each and hang up while the first runs and two
    wait. Their rows are given up (the running batch stops at its next step, the queued ones never
    run), so a request sent right after them is not queued behind 3 x 200 steps that nobody waits
    for; each counts as 499, is logged at info, and nothing reaches the server's log as an error.
    Before the fix all three ran to the end: the next request took 2.7x one slow request alone."""
    batcher = server.runtime.batcher
    t0 = time.monotonic()
    assert client.post("/v1/generate", json=slow_body(0)).status_code == 200
    alone_s = time.monotonic() - t0
    before = client.get("/metrics").text
    hung_up = threading.Event()
    original, ran = recording_batches(batcher, hold_first=hung_up)  # the first is running (its future) until they hang up
    try:
        with serving.logged("uvicorn.error", "asyncio", "diffrt.serve") as records:
            sockets = []
            for i in (1, 2, 3):
                sockets.append(serving.post_and_hold(server.url + "/v1/generate", slow_body(i), {"Authorization": f"Bearer {API_KEY}"}))
                serving.wait_until(lambda: batcher.in_flight == i, f"slow request {i} to be taken")
            assert batcher.depth == 2  # one running, two queued
            for sock in sockets:
                sock.close()
            given_up = lambda: [x for x in records if "given up" in x.getMessage()]  # noqa: E731
            deadline = time.monotonic() + 10  # the server sees the hang-ups (no assert here: without them, the timing fails below)
            while len(given_up()) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            hung_up.set()
            t0 = time.monotonic()
            r = client.post("/v1/generate", json={"class_label": 2, "seed": 9, "num_inference_steps": 2})
            after_s = time.monotonic() - t0
            assert r.status_code == 200, r.text
            assert after_s < 0.5 * alone_s, (after_s, alone_s)  # not behind 3 x 200 steps for nobody
    finally:
        hung_up.set()
        batcher.run_batch = original
    assert ran == [([1], "abandoned"), ([9], "answered")]  # the queued two never ran
    assert sorted(x.getMessage().split(" while ")[1].split(" ")[0] for x in given_up()) == ["queued", "queued", "running"]
    assert all(x.levelno == logging.INFO for x in given_up())
    assert not [x for x in records if x.levelno >= logging.WARNING], [x.getMessage() for x in records]
    after = client.get("/metrics").text
    assert metric(after, "diffrt_serve_requests_total", status=499) - metric(before, "diffrt_serve_requests_total", status=499) == 3
    assert metric(after, "diffrt_serve_requests_total", status=200) - metric(before, "diffrt_serve_requests_total", status=200) == 1
    assert batcher.depth == 0 and batcher.in_flight == 0
    assert client.post("/v1/generate", json={"class_label": 3, "seed": 1, "num_inference_steps": 1}).status_code == 200


def test_cancelling_a_waiting_request_gives_its_rows_up(server, caplog):
    """Ray Serve's way of saying a client has gone: its proxy cancels the replica's call, so the task
    awaiting ServeRuntime.generate is cancelled. Its rows are given up whether the request was being
    planned (queued after its client left: dropped once queued), waiting in the queue, or running."""
    from diffrt.serve.schema import GenerateBody

    runtime, batcher = server.runtime, server.runtime.batcher
    release, planning, planned, worker_free = threading.Event(), threading.Event(), [], threading.Event()
    original, ran = recording_batches(batcher, hold_first=worker_free)
    submit = runtime.submit

    def slow_planning(body, encoding="png", request_id=""):
        planning.set()
        release.wait(30)
        planned.append(submit(body, encoding, request_id))
        return planned[-1]

    async def until(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def hang_up_three() -> list:
        running = asyncio.ensure_future(runtime.generate(GenerateBody(**slow_body(1)), "hung-up-1"))
        await until(lambda: batcher.in_flight == 1 and batcher.depth == 0, "the first request to be taken")
        queued = asyncio.ensure_future(runtime.generate(GenerateBody(**slow_body(2))))
        await until(lambda: batcher.depth == 1, "the second request to queue")
        runtime.submit = slow_planning
        being_planned = asyncio.ensure_future(runtime.generate(GenerateBody(**slow_body(3))))
        await until(planning.is_set, "the third request to be planned")
        tasks = (running, queued, being_planned)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        release.set()  # the third is queued now, after its client left (asyncio.run waits for its thread)
        return [task.cancelled() for task in tasks]

    try:
        with caplog.at_level("INFO", logger="diffrt.serve.runtime"):
            assert asyncio.run(hang_up_three()) == [True, True, True]
        # The log names the request as its client did (its X-Request-Id on the HTTP route).
        assert "request hung-up-1 given up while running (1 image(s)): its client has gone" in caplog.text
        assert len(planned) == 1 and batcher.depth == 0  # queued, and given up at once
        worker_free.set()  # the first starts sampling, for nobody
        serving.wait_until(lambda: ran and batcher.in_flight == 0, "the worker to finish")
    finally:
        release.set()
        worker_free.set()
        runtime.__dict__.pop("submit", None)
        batcher.run_batch = original
    assert ran == [([1], "abandoned")]  # stopped at its first step; the queued and the late one never ran
    assert planned[0].future.cancelled() and planned[0].expired
    assert batcher.depth == 0


def test_a_forced_stop_answers_503_and_waits_for_the_worker(served_model):
    """From the second serve review: a second Ctrl-C (uvicorn's force exit) cancelled the requests into uvicorn's
    plain-text 500s, and the process ended under the worker thread inside ONNX Runtime (aborted, exit status 134)."""
    config = ServeConfig(model=served_model, port=0, api_key_env=None, max_batch_size=4, batch_wait_ms=5,
                         timeout_s=60, device="cpu", log_level="warning")
    srv = BackgroundServer(config).start()
    original, gate = srv.runtime.batcher.run_batch, threading.Event()
    srv.runtime.batcher.run_batch = lambda jobs: gate.wait(30) and original(jobs)  # hold it running
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(httpx.post, srv.url + "/v1/generate", json={"class_label": 1, "num_inference_steps": STEPS}, timeout=60)
        serving.wait_until(lambda: srv.runtime.batcher.in_flight == 1, "the request to be running")
        srv.server.should_exit = srv.server.force_exit = True  # what uvicorn sets on a second SIGINT
        threading.Timer(1.0, gate.set).start()  # the worker goes on a second later, to find its request given up
        answer = future.result(60)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1" and "retry" in answer.json()["detail"]
    srv.thread.join(60)
    assert not srv.thread.is_alive() and not srv.runtime.batcher.alive  # the worker stopped before the server's thread ended


def test_a_second_ctrl_c_on_diffrt_serve_answers_503_and_exits_after_the_worker(served_model, tmp_path):
    """The command itself, as a user stops it: uvicorn re-raises the signals it caught once it stops, so the second
    Ctrl-C came out of server.run() as a KeyboardInterrupt, past the wait for the worker (a review's; the test above
    sets uvicorn's flag in a thread, where no signal is caught). The process ended under the worker thread inside
    ONNX Runtime's run: aborted, exit status 134."""
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "diffrt", "serve", "--port", str(port), "--backend", "onnxruntime", "--device", "cpu",
               "--timeout", "120"] + (["--model", served_model] if served_model else [])
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "DIFFRT_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:  # or ended: its stderr says why
            try:
                return server.poll() is not None or httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        serving.wait_until(ready, "the service to be ready", timeout=120)
        assert server.poll() is None, server.stderr.read()
        with ThreadPoolExecutor(max_workers=4) as pool:  # seconds of work each (one eta each: one batch each), queued
            answers = [pool.submit(httpx.post, url + "/v1/generate", timeout=120,
                                   json={"class_label": 1, "num_images": 8, "num_inference_steps": 200, "eta": i / 10})
                       for i in range(4)]
            # The first taken (running: the worker inside a run), the other three waiting behind it.
            serving.wait_until(lambda: re.search(r"^diffrt_serve_queue_depth 3\.0$", httpx.get(url + "/metrics", timeout=5).text, re.M),
                               "one request running and three queued", timeout=60)
            server.send_signal(signal.SIGINT)
            time.sleep(0.5)
            server.send_signal(signal.SIGINT)
            replies = [answer.result(120) for answer in answers]
        code = server.wait(120)
    finally:
        if server.poll() is None:
            server.kill()
    stderr = server.stderr.read()
    for reply in replies:  # the running one and the queued ones alike
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
    # Ended by the signal (diffrt.cli.entry), not aborted (-6) in the C++ runtime under the worker.
    assert code == -signal.SIGINT and "terminate called" not in stderr, (code, stderr[-2000:])
    assert "the worker stops at its next step" in stderr  # the wait for it ran


def test_graceful_shutdown_finishes_in_flight_requests(served_model):
    config = ServeConfig(model=served_model, port=0, api_key_env=None, max_batch_size=4, batch_wait_ms=5,
                         timeout_s=60, device="cpu", log_level="warning")
    srv = BackgroundServer(config).start()
    url = srv.url + "/v1/generate"
    original, gate = srv.runtime.batcher.run_batch, threading.Event()
    srv.runtime.batcher.run_batch = lambda jobs: gate.wait(30) and original(jobs)  # hold the first one running
    body = {"class_label": 1, "num_inference_steps": STEPS}
    with ThreadPoolExecutor(max_workers=3) as pool:  # each its own eta: one batch each
        futures = [pool.submit(httpx.post, url, json={**body, "seed": i, "eta": 0.5 + i / 10}, timeout=60) for i in range(3)]
        batcher = srv.runtime.batcher
        serving.wait_until(lambda: batcher.in_flight == 3 and batcher.depth == 2, "one request running (held), two queued")
        threading.Timer(0.5, gate.set).start()  # let the worker go once shutdown has begun
        srv.stop(timeout=60)
        codes = [f.result(60).status_code for f in futures]
    assert codes == [200, 200, 200]
    assert not srv.thread.is_alive() and not srv.runtime.batcher.alive


# -- the Gradio demo --------------------------------------------------------------------------

def test_ui_builds_and_generates(server, served_model):
    pytest.importorskip("gradio")
    from diffrt.serve.ui import DISPLAY_SIZE, build_ui, canny_edges, make_generate, to_hex

    demo = build_ui(server.runtime)
    assert demo is not None
    image, latency = make_generate(server.runtime)(class_label=3, prompt=None, negative_prompt=None, steps=STEPS,
                                                   guidance_scale=3.0, use_color=True, color="rgba(255, 136, 0, 1)",
                                                   color_scale=4.0, seed=7)
    assert re.search(r"\d+ ms", latency) and "onnxruntime" in latency

    def shown(**request) -> np.ndarray:
        """The request run through the pipeline (`diffrt generate`), enlarged as the demo shows it:
        each pixel a k x k block (a whole factor, no smoothing) up to DISPLAY_SIZE."""
        ref = generate(GenerateRequest(model=served_model, backend="onnxruntime", seed=7, num_inference_steps=STEPS,
                                       guidance_scale=3.0, **request))
        small = pixels(png_bytes(ref.images[0]))
        k = DISPLAY_SIZE // max(small.shape[:2])
        assert k > 1, small.shape
        return small.repeat(k, axis=0).repeat(k, axis=1)

    want = shown(class_label=3, color="#ff8800", color_scale=4.0)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), want)
    # What the browser gets is the file Gradio writes: PNG, the same pixels (its default, WebP at quality 80, was not).
    import gradio as gr
    from PIL import Image

    output = next(c for c in demo.blocks.values() if isinstance(c, gr.Image) and c.label == "image")
    sent = output.postprocess(image)
    np.testing.assert_array_equal(np.asarray(Image.open(sent.path).convert("RGB")), want)
    # The check can tell the label and the colour apart: other ones give other pixels.
    assert not np.array_equal(shown(class_label=0, color="#ff8800", color_scale=4.0), want)
    assert not np.array_equal(shown(class_label=3), want)
    # The sampler control: LCM, as `diffrt generate --scheduler lcm` samples it.
    image, _ = make_generate(server.runtime)(class_label=3, prompt=None, negative_prompt=None, steps=STEPS, guidance_scale=3.0,
                                             use_color=False, color=None, color_scale=0.0, seed=7, scheduler="lcm")
    lcm = shown(class_label=3, scheduler="lcm")
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), lcm)
    assert not np.array_equal(lcm, shown(class_label=3))
    assert to_hex("rgba(255, 136, 0, 1)") == "#ff8800" == to_hex("FF8800".lower())
    # Refusals are one line naming the field, in the status text, and the controls start at the API's defaults.
    ui = make_generate(server.runtime)
    ask = dict(class_label=3, prompt=None, negative_prompt=None, steps=STEPS, guidance_scale=3.0, use_color=False, color=None,
               color_scale=4.0, seed=7)
    for change, message in [(dict(class_label=None), "refused: class label is empty"),
                            (dict(guidance_scale=None), "refused: guidance scale is empty"),
                            (dict(use_color=True, color=""), "colour guidance is ticked with no colour"),
                            (dict(use_color=True, color="rgb(300, 0, 0)"), "each of red, green and blue is 0 to 255"),
                            (dict(steps=0), "refused: num_inference_steps: Input should be greater than or equal to 1"),
                            (dict(class_label=12), "class_label")]:
        image, line = ui(**{**ask, **change})
        assert image is None and message in line and "\n" not in line, (change, line)
    from diffrt.serve.schema import GenerateBody
    from diffrt.serve.ui import default_guidance

    slider = next(c for c in demo.blocks.values() if isinstance(c, gr.Slider) and c.label == "guidance scale")
    info = server.runtime.describe()
    assert slider.value == default_guidance(info, "") == default_guidance(info, "lcm") == server.runtime.worker.plan(
        GenerateBody(class_label=3)).settings["guidance_scale"]
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    edges = canny_edges(square)
    assert edges.shape == (32, 32, 3) and edges.any() and not edges[16, 16].any()
    # An upload of any size is shrunk first (a security review's 6000 x 6000 photo: 15 s and 2.3 GB of Canny).
    photo = np.zeros((3000, 1500, 3), np.uint8)
    photo[1000:2000, 500:1000] = 255
    assert canny_edges(photo).shape == (1024, 512, 3)


# -- Ray Serve --------------------------------------------------------------------------------

PROXY_HOST = (b"host", b"127.0.0.1:8000")  # the Host header Ray's proxy passes on, as its client sent it

@pytest.mark.slow
def test_ray_serve_replica_answers_like_the_service(served_model, pipe):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    import socket

    from diffrt.serve.ray_app import build_deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path("/tmp") / f"ray_serve_test_{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20, _temp_dir=str(temp))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(model=served_model, api_key_env=None, max_batch_size=4, max_queue=8, device="cpu")
        serve.run(build_deployment(config, min_replicas=1, max_replicas=1), route_prefix="/v1/generate")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"class_label": 2, "seed": 21, "num_inference_steps": STEPS},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-diffrt-backend"] == "onnxruntime"
        assert np.array_equal(pixels(r.content), solo(pipe, 2, 21))
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"class_label": 2, "nope": 1}, timeout=60)
        assert bad.status_code == 422 and "nope" in bad.json()["detail"]
        # Clients that hang up: Ray's proxy cancels the replica's call and the runtime gives the rows up
        # (the running batch at its next step), so the next request does not wait behind them.
        url = f"http://127.0.0.1:{port}/v1/generate"
        t0 = time.monotonic()
        assert httpx.post(url, json=slow_body(0), timeout=120).status_code == 200
        alone_s = time.monotonic() - t0
        sockets = [serving.post_and_hold(url, slow_body(i)) for i in (1, 2, 3)]
        time.sleep(0.5)  # they reach the replica, the first starts sampling
        for sock in sockets:
            sock.close()
        time.sleep(0.5)  # the proxy sees the hang-ups
        t0 = time.monotonic()
        assert httpx.post(url, json={"class_label": 2, "seed": 9, "num_inference_steps": 2}, timeout=120).status_code == 200
        assert time.monotonic() - t0 < 0.3 * alone_s, alone_s
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_provider_fallback_is_counted(served_model, monkeypatch):
    # A CPU-only ONNX Runtime asked for CUDA runs on the CPU, as a CUDA provider without its libraries would.
    from diffrt.runtime.backends import onnxruntime as ort_backend
    from diffrt.serve.runtime import RuntimeConfig, ServeRuntime

    monkeypatch.setattr(ort_backend, "default_providers", lambda *args, **kwargs: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    runtime = ServeRuntime(RuntimeConfig(model=served_model, backend="onnxruntime", device="cpu", warmup_steps=1))
    runtime.start()
    try:
        runtime.wait_ready(120)
        assert metric(runtime.metrics.exposition().decode(), "diffrt_serve_provider_fallbacks") == 1
    finally:
        runtime.close(30)


def test_a_warm_up_that_draws_nan_never_turns_ready_and_a_nan_fails_only_its_own_request(served_model, monkeypatch):
    """The readiness NaN self-test had no test: images that are not finite while every noise prediction is (what an
    fp16 VAE that overflows gives) must keep a replica out of rotation. Once serving, a request whose images come out
    NaN fails alone: its batchmates, refused with it before, get the images they get alone. diffrt_serve_nonfinite
    counts the refused requests in the worker, whether or not anyone still awaits them."""
    import dataclasses

    from diffrt.errors import NonFiniteOutputError
    from diffrt.runtime.pipeline import PixelPipeline
    from diffrt.serve.runtime import RuntimeConfig, ServeRuntime
    from diffrt.serve.schema import GenerateBody

    poisoned, call = [None], PixelPipeline.__call__  # None: every image, else the rows of that class label

    def nan_images(self, labels=None, *args, **kwargs):
        result = call(self, labels, *args, **kwargs)
        if poisoned[0] is False:
            return result
        rows = torch.ones(len(result.images), dtype=torch.bool) if poisoned[0] is None else labels == poisoned[0]
        return dataclasses.replace(result, images=torch.where(rows.view(-1, 1, 1, 1), float("nan"), result.images))

    monkeypatch.setattr(PixelPipeline, "__call__", nan_images)
    settings = dict(model=served_model, backend="onnxruntime", device="cpu", warmup_steps=1)
    runtime = ServeRuntime(RuntimeConfig(**settings))
    runtime.start()
    try:
        with pytest.raises(NonFiniteOutputError, match="self-test: .* non-finite images"):
            runtime.wait_ready(120)
        assert not runtime.ready and not runtime.alive and "self-test" in runtime.dead_reason
        assert metric(runtime.metrics.exposition().decode(), "diffrt_serve_ready") == 0
    finally:
        runtime.close(10)

    poisoned[0] = False
    runtime = ServeRuntime(RuntimeConfig(**settings, max_batch_size=8, batch_wait_ms=2000, exact_batching=False))
    runtime.start()
    try:
        runtime.wait_ready(120)

        def submitted(*requests: tuple[int, int]) -> list:  # (class label, seed) each, at once: one batch
            # eta > 0: each request's generator draws step noise, which the failed batch had drawn already
            return [runtime.submit(GenerateBody(class_label=label, seed=seed, num_inference_steps=2, eta=1.0))
                    for label, seed in requests]

        alone = {seed: submitted((3, seed))[0].future.result(60) for seed in (0, 2)}  # one after another
        poisoned[0] = 9
        healthy, sick, also_healthy = submitted((3, 0), (9, 1), (3, 2))
        for job, seed in ((healthy, 0), (also_healthy, 2)):  # nobody awaits them as a request would
            assert job.future.result(60).images == alone[seed].images
        with pytest.raises(NonFiniteOutputError):
            sick.future.result(60)
        text = runtime.metrics.exposition().decode()
        assert metric(text, "diffrt_serve_batch_size_count") == 2 + 1 + 3  # the three shared one batch, then ran alone
        assert metric(text, "diffrt_serve_nonfinite_total") == 1
        assert runtime.batcher.failed_in_row == 0  # a request's NaN is not the engine's failure
    finally:
        runtime.close(10)


# -- from a review of the serving code -------------------------------------------------------

def test_a_replica_is_not_ready_until_its_warm_up_and_self_test_have_run(served_model, monkeypatch):
    """From a review of RELIABILITY.md's serving conventions: nothing showed that readiness waits for the warm-up and
    the NaN self-test (a `ready` that looked at the batcher alone passed every test). Held in its self-test, the
    replica answers /readyz and /v1/generate 503 "loading" and reports diffrt_serve_ready 0; then it turns ready."""
    from diffrt.serve import worker

    held, self_test = threading.Event(), worker.PixelWorker.self_test

    def slow_self_test(self):
        assert held.wait(120)
        return self_test(self)

    monkeypatch.setattr(worker.PixelWorker, "self_test", slow_self_test)
    from fastapi.testclient import TestClient

    from diffrt.serve.app import create_app

    app = create_app(ServeConfig(model=served_model, backend="onnxruntime", api_key_env=None, device="cpu", warmup_steps=1,
                                 max_batch_size=1, log_level="warning"))
    with TestClient(app) as c:  # its lifespan starts the runtime, and returns without waiting for it to be ready
        try:
            runtime = app.state.runtime
            deadline = time.monotonic() + 120
            while runtime.worker is None or runtime.worker.pipe is None:  # the model loaded: the self-test is next
                assert time.monotonic() < deadline, "the model never loaded"
                time.sleep(0.05)
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["detail"] == "loading", ready.text
            answer = c.post("/v1/generate", json={"class_label": 1, "seed": 1, "num_inference_steps": 1})
            assert answer.status_code == 503 and "loading" in answer.text, answer.text
            assert metric(c.get("/metrics").text, "diffrt_serve_ready") == 0
        finally:
            held.set()
        runtime.wait_ready(120)
        assert c.get("/readyz").status_code == 200 and metric(c.get("/metrics").text, "diffrt_serve_ready") == 1
        assert c.post("/v1/generate", json={"class_label": 1, "seed": 1, "num_inference_steps": 1}).status_code == 200


def test_a_worker_whose_batches_all_fail_turns_unhealthy_and_recovers():
    """A sticky engine error (a CUDA illegal address) failed every batch with the thread alive, and /healthz,
    /readyz and Ray's check_health stayed green, so no orchestrator replaced the replica."""
    from diffrt.serve.batcher import FAILING_BATCHES

    broken: list[BaseException | None] = [None]

    def run(jobs):
        if broken[0] is not None:
            raise broken[0]
        return {job.id: "ok" for job in jobs}

    from diffrt.errors import NonFiniteOutputError
    from diffrt.serve.runtime import engine_failure

    batcher = Batcher(run, max_batch_size=1, max_queue=8, wait_s=0, engine_failure=engine_failure)
    batcher.start()
    try:
        # A batch's own failures do not count (the review's bug: NaN for one prompt, a batch every client gave up on,
        # three in a row, took a working replica down).
        for failure in (NonFiniteOutputError("the unet produced NaN"), BatchAbandoned("every client gone")) * FAILING_BATCHES:
            broken[0] = failure
            with pytest.raises(type(failure)):
                batcher.submit(Job(None, 1, "own", deadline=time.monotonic() + 10)).result(5)
        assert batcher.alive and batcher.failed_in_row == 0
        from diffrt.errors import ArtifactError

        assert engine_failure(ArtifactError("could not create an execution context (out of GPU memory?)"))
        broken[0] = RuntimeError("CUDA error: an illegal memory access was encountered")
        for i in range(FAILING_BATCHES):
            assert batcher.alive  # a failure or two may be the requests'
            with pytest.raises(RuntimeError, match="illegal memory access"):
                batcher.submit(Job(None, 1, f"r{i}", deadline=time.monotonic() + 10)).result(5)
        assert not batcher.alive and batcher.failed_in_row == FAILING_BATCHES
        broken[0] = None
        assert batcher.submit(Job(None, 1, "ok", deadline=time.monotonic() + 10)).result(5) == "ok"
        assert batcher.alive  # one batch that works: the engine works
        # A batch answered request by request (the runtime's re-run after a NaN): an engine error among the answers
        # counts as a failed batch would (a review's: the broken engine stayed alive), a request's own error does not.
        answers: list = [RuntimeError("CUDA error: an illegal memory access was encountered")]
        batcher.run_batch = lambda jobs: {job.id: answers[0] for job in jobs}
        for i in range(FAILING_BATCHES):
            with pytest.raises(RuntimeError, match="illegal memory access"):
                batcher.submit(Job(None, 1, f"solo{i}", deadline=time.monotonic() + 10)).result(5)
        assert not batcher.alive and batcher.failed_in_row == FAILING_BATCHES
        answers[0] = NonFiniteOutputError("the unet produced NaN")
        with pytest.raises(NonFiniteOutputError):
            batcher.submit(Job(None, 1, "own-nan", deadline=time.monotonic() + 10)).result(5)
        assert batcher.alive and batcher.failed_in_row == 0
    finally:
        batcher.close(5)


def test_health_answers_say_why_the_engine_counts_as_dead(served_model, monkeypatch):
    from fastapi.testclient import TestClient

    from diffrt.serve.app import create_app
    from diffrt.serve.batcher import FAILING_BATCHES

    app = create_app(ServeConfig(model=served_model, backend="onnxruntime", api_key_env=None, device="cpu", warmup_steps=1,
                                 max_batch_size=2, log_level="warning"))
    with TestClient(app, raise_server_exceptions=False) as c:
        runtime = app.state.runtime
        runtime.wait_ready(300)

        def dead(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(runtime.worker.pipe, "__call__", dead, raising=False)
        monkeypatch.setattr(type(runtime.worker.pipe), "__call__", dead)
        for seed in range(FAILING_BATCHES):
            assert c.post("/v1/generate", json={"class_label": 1, "seed": seed, "num_inference_steps": 1}).status_code == 500
        answer = c.get("/healthz")
        assert answer.status_code == 503 and f"its last {FAILING_BATCHES} batches failed" in answer.json()["detail"]
        # Readiness stays: out of rotation the replica would get no batch to recover with; liveness restarts it.
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize("settings, message", [
    (dict(batch_wait_ms=float("nan")), "the batch wait must be a number of milliseconds >= 0, got nan"),
    (dict(timeout_s=float("nan")), "--timeout must be a number of seconds > 0, got nan"),
    (dict(timeout_s=-1.0), "--timeout must be a number of seconds > 0"),
    (dict(max_batch_size=0), "--max-batch-size must be an integer >= 1, got 0"),
    (dict(max_queue=0), "--max-queue must be an integer >= 1, got 0"),
])
def test_service_settings_that_would_hang_or_time_out_at_once_are_one_line(settings, message, capsys):
    """A NaN batch wait hung the worker (health checks green, every request 504); a NaN or negative timeout
    answered 504 at once; a zero batch or queue was a ValueError traceback; triton-repo wrote them all out."""
    from diffrt.cli import main
    from diffrt.errors import DiffrtError
    from diffrt.serve.runtime import RuntimeConfig
    from diffrt.serve.triton_repo import RepositoryConfig, write_repository

    with pytest.raises(DiffrtError, match=message):
        RuntimeConfig(**settings)
    flags = {"batch_wait_ms": "--batch-wait-ms", "timeout_s": "--timeout", "max_batch_size": "--max-batch-size", "max_queue": "--max-queue"}
    (name, value), = settings.items()
    assert main(["serve", flags[name], str(value), "--port", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrt: error:")]
    assert len(errors) == 1 and message in errors[0]
    repo = {"batch_wait_ms": "queue_delay_ms"}.get(name, name)  # triton-repo names its own flag
    with pytest.raises(DiffrtError, match={"batch_wait_ms": "--queue-delay-ms must be a number of milliseconds >= 0"}.get(name, message.split(",")[0])):
        write_repository(Path("/nonexistent-never-written"), RepositoryConfig(**{repo: value}))


@pytest.mark.parametrize("flags, message", [
    (["--max-image-side", "-1"], "--max-image-side must be a number of pixels >= 1 (0: the default), got -1"),
    (["--body-timeout", "0"], "--body-timeout must be a number of seconds > 0, got 0.0"),
    (["--max-connections", "0"], "--max-connections must be an integer >= 1, got 0"),
])
def test_the_new_guards_settings_are_checked(flags, message, capsys):
    """A negative --max-image-side refused every request (`-1 or default` stays -1)."""
    from diffrt.cli import main

    assert main(["serve", *flags, "--port", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrt: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_a_client_gone_while_sending_its_body_counts_as_499_not_500(client, server):
    """Counted as a 500 (the service's failure, paging whoever watches 5xx) though no answer was owed."""
    import socket

    before = metric(client.get("/metrics").text, "diffrt_serve_requests_total", status="499")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"class_la")
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(client.get("/metrics").text, "diffrt_serve_requests_total", status="499") == before + 1:
            break
        time.sleep(0.1)
    assert metric(client.get("/metrics").text, "diffrt_serve_requests_total", status="499") == before + 1


def test_json_python_cannot_parse_is_refused_in_diffrts_form(client):
    for body in (b'{"seed": ' + b"9" * 5000 + b"}", b"[" * 100_000):
        r = client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json() == {"detail": r.json()["detail"], "field": None}
        assert "not JSON diffrt can read" in r.json()["detail"]
    # Bytes that are not UTF-8 were blamed on long numbers and deep nesting too; UTF-16, which JSON allows, is read.
    r = client.post("/v1/generate", content=b'{"class_label": 1, "color": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == "the body is not valid UTF-8 text (at byte 29); send JSON encoded as UTF-8"
    body = json.dumps({"class_label": 1, "seed": 1, "num_inference_steps": 1}).encode("utf-16")
    assert client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"}).status_code == 200


def test_the_ray_route_answers_a_body_as_the_service_does(served_model, client):
    """From a review of both front ends: a UTF-8 BOM (the service: 200), a lone surrogate (422 naming the field), a
    number of thousands of digits, bad JSON, a GET and an oversized body got other answers from the Ray route; a body
    without a Content-Type got a 422 about the body from the service (FastAPI's strict content types); and the route's
    API key was read from the replica's environment, not the driver's."""
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from diffrt.serve.ray_app import DiffrtDeployment

    config = ServeConfig(model=served_model, api_key_env=None, device="cpu", warmup_steps=1, max_batch_size=2,
                         max_body_bytes=16 << 20)  # the service's
    deployment = DiffrtDeployment.func_or_class(asdict(config), api_key=API_KEY)  # as build_deployment binds it
    good = b'{"class_label": 1, "seed": 2, "num_inference_steps": 1}'
    json_type = [(b"content-type", b"application/json")]
    cases = [("BOM", "POST", b"\xef\xbb\xbf" + good, json_type), ("no content type", "POST", good, []),
             ("surrogate", "POST", b'{"class_label": 1, "color": "\\ud800"}', json_type),
             ("bad JSON", "POST", good[:-1], json_type), ("huge number", "POST", b'{"seed": ' + b"1" * 5000 + b"}", json_type),
             ("GET", "GET", b"", []), ("too large", "POST", b'{"prompt": "' + b"a" * (17 << 20) + b'"}', json_type),
             ("another origin", "POST", good, [(b"origin", b"https://evil.example")]),  # no Content-Type: no preflight
             ("not UTF-8", "POST", b'{"class_label": 1, "color": "\xff"}', json_type)]
    key = [(b"authorization", f"Bearer {API_KEY}".encode())]

    def request(method: str, body: bytes, headers: list) -> Request:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        return Request({"type": "http", "method": method, "path": "/v1/generate", "query_string": b"",
                        "headers": [PROXY_HOST, *headers]}, receive)

    async def ray_answers():
        answers = [await deployment(request(method, body, headers + key)) for _, method, body, headers in cases]
        return answers, await deployment(request("POST", good, json_type))  # no key

    try:
        answers, keyless = asyncio.run(ray_answers())
        assert keyless.status_code == 401
        for (name, method, body, headers), ray in zip(cases, answers):
            served = client.request(method, "/v1/generate", content=body or None, headers=dict((k.decode(), v.decode()) for k, v in headers))
            assert ray.status_code == served.status_code, (name, ray.body, served.text)
            if ray.status_code == 200:
                assert ray.body == served.content, name
            else:  # the size read before the limit stopped it depends on the chunks: the rest must be equal
                detail = (lambda text: text.split(" or more; ")[-1])
                assert detail(json.loads(ray.body)["detail"]) == detail(served.json()["detail"]), (name, ray.body, served.text)
    finally:
        deployment.runtime.close(10)


def test_the_ray_route_refuses_as_the_service_does(served_model):
    """Without a Ray cluster: the deployment class itself, called as the proxy calls it. A form body was a 400
    'not valid JSON' (the service: 415), an empty one a 400 (422), and no latency was ever observed."""
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from diffrt.serve.ray_app import DiffrtDeployment

    deployment = DiffrtDeployment.func_or_class(asdict(ServeConfig(model=served_model, api_key_env=None, device="cpu",
                                                                   warmup_steps=1, max_batch_size=2)))

    def request(body: bytes, kind: str = "application/json", extra: tuple = (), host: tuple = PROXY_HOST) -> Request:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        return Request({"type": "http", "method": "POST", "path": "/v1/generate", "query_string": b"",
                        "headers": [(b"content-type", kind.encode()), host, *extra]}, receive)

    good = b'{"class_label": 1, "seed": 2, "num_inference_steps": 1, "num_images": 2}'

    async def answers():
        return [await deployment(request(good)),
                await deployment(request(b"class_label=1", "application/x-www-form-urlencoded")),
                await deployment(request(b"")),
                await deployment(request(good, extra=((b"x-request-id", b"as sent"),))),  # as Ray's proxy passes it on
                await deployment(request(good, host=(b"host", b"evil.example:8000")))]

    try:
        ok, form, empty, named, rebound = asyncio.run(answers())
        assert (ok.status_code, form.status_code, empty.status_code) == (200, 415, 422)
        # From the serving review: on loopback (the default config, and README's proxy) the route answered any Host, so
        # a page of evil.example, its name pointed at 127.0.0.1, could generate and read the images; `diffrt serve` 421s.
        assert rebound.status_code == 421 and b"'evil.example:8000' is not this service's" in rebound.body
        assert b"deploy it with ServeConfig(allowed_hosts=...)" in rebound.body  # not serve's --allowed-host
        # The request goes by the id Ray's proxy names it by, which the proxy puts on the answer itself: once (a review's).
        assert json.loads(named.body)["id"] == "as sent" and re.fullmatch("[0-9a-f]{32}", json.loads(ok.body)["id"])
        assert all("x-request-id" not in answer.headers for answer in (ok, form, empty, named))
        assert b"request body is missing" in empty.body
        assert metric(deployment.runtime.metrics.exposition().decode(), "diffrt_serve_request_seconds_count") == 2
    finally:
        deployment.runtime.close(10)


def test_ray_check_health_fails_once_the_engine_fails_every_batch(served_model, monkeypatch):
    """No test called check_health, Ray's only way to learn that a replica must be replaced."""
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from diffrt.runtime.pipeline import PixelPipeline
    from diffrt.serve.batcher import FAILING_BATCHES
    from diffrt.serve.ray_app import DiffrtDeployment

    deployment = DiffrtDeployment.func_or_class(asdict(ServeConfig(model=served_model, api_key_env=None, device="cpu",
                                                                   warmup_steps=1, max_batch_size=2)))

    def request(seed: int) -> Request:
        messages = [{"type": "http.request", "body": json.dumps({"class_label": 1, "seed": seed, "num_inference_steps": 1}).encode(),
                     "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        return Request({"type": "http", "method": "POST", "path": "/v1/generate", "query_string": b"",
                        "headers": [(b"content-type", b"application/json"), PROXY_HOST]}, receive)

    def dead(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    try:
        deployment.check_health()  # loaded and self-tested: healthy
        monkeypatch.setattr(PixelPipeline, "__call__", dead)
        for seed in range(FAILING_BATCHES):
            deployment.check_health()  # a failure or two may be the requests'
            assert asyncio.run(deployment(request(seed))).status_code == 500
        with pytest.raises(RuntimeError, match=f"diffrt: its last {FAILING_BATCHES} batches failed .*illegal memory access"):
            deployment.check_health()
    finally:
        deployment.runtime.close(10)


def test_a_replica_asks_ray_for_a_gpu_where_the_cluster_has_one(monkeypatch):
    """The GPU request was decided when the module was imported, by the driver's CUDA: a driver without a GPU sent
    every replica to a CPU, however many GPUs the cluster had."""
    import ray

    from diffrt.serve.ray_app import deployment_for, replica_gpus

    def asked(config, **kwargs) -> float:
        return deployment_for(config, **kwargs).ray_actor_options["num_gpus"]

    assert asked(ServeConfig(device="cpu")) == 0 and asked(ServeConfig(device="cuda")) == 1
    # From the serving review: a replica sees only the GPU Ray gave it, as cuda:0; "cuda:1" could never load.
    with pytest.raises(ValueError, match=r"device 'cuda:1' names a GPU by number, .*from cuda:0: pass device='cuda'"):
        asked(ServeConfig(device="cuda:1"))
    with pytest.raises(ValueError, match=r"device 'cuda:1' names a GPU by number"):
        asked(ServeConfig(device="cuda:1"), num_gpus=0.5)
    assert asked(ServeConfig(device="cuda:0")) == 1 and asked(ServeConfig(device="cuda:1"), num_gpus=2) == 2
    # And requests past a replica's batch and queue wait at Ray's proxy no longer without bound (Ray's default, -1),
    # refused past it as the service refuses a full queue (429 with Retry-After; Ray's default was a bare 503).
    bounded = deployment_for(ServeConfig(device="cpu", max_batch_size=4, max_queue=7))
    assert (bounded.max_ongoing_requests, bounded.max_queued_requests) == (11, 7)
    backpressure = getattr(bounded, "backpressure_config", None)
    assert backpressure is None or (backpressure.status_code, backpressure.retry_after_s) == (429, 1)
    assert asked(ServeConfig(device="cpu"), num_gpus=0.5) == 0.5  # an explicit request wins
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for gpus in (0, 4):
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(gpus)})
        assert asked(ServeConfig()) == (1 if gpus else 0)  # the device left to the replica: the cluster decides
    with pytest.raises(ValueError, match="num_gpus must be >= 0"):
        replica_gpus(ServeConfig(), -1)


def test_ray_serves_its_own_deploy_paths(served_model):
    """From a review: no import path served `serve run` or a Serve config file (build_deployment takes a ServeConfig,
    Ray's builders a dict of text), so only a Python driver could deploy it. `app` takes the settings as `serve run`
    passes them."""
    pytest.importorskip("ray")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as build  # what `serve run` calls

    from diffrt.serve.ray_app import app

    built = build(app, {"model": served_model, "device": "cpu", "max_batch_size": "4", "max_queue": "7", "exact_batching": "false",
                        "allowed_hosts": "a.example, b.example", "controlnet": "cn/a,cn/b", "max_replicas": "2"})
    deployment = built._bound_deployment
    settings = deployment.init_args[0]
    assert (settings["model"], settings["max_batch_size"], settings["exact_batching"]) == (served_model, 4, False)
    assert settings["allowed_hosts"] == ("a.example", "b.example") and settings["controlnet"] == ["cn/a", "cn/b"]
    assert deployment.max_ongoing_requests == 11
    for bad, message in [({"max_batch_size": "four"}, "max_batch_size='four': not an int"),
                         ({"strict": "maybe"}, "strict='maybe': true or false"), ({"modle": "x"}, "unknown argument 'modle'")]:
        with pytest.raises(ValueError, match=message):
            app({"device": "cpu", **bad})
    # `serve run` builds before it connects to the cluster: the GPU request read from this machine is said, with the fix.
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffrt.serve.ray_app").addHandler(handler)
    try:
        app({"model": served_model})
    finally:
        logging.getLogger("diffrt.serve.ray_app").removeHandler(handler)
    assert any("pass num_gpus=1 (or device=cuda) for GPU replicas" in r.getMessage() for r in records)


def test_the_ray_route_times_out_a_slow_body_and_counts_a_hang_up(served_model):
    """From a review: the route read the body with no deadline (a sender that stopped midway held a replica's slot for
    as long as its socket stayed open; `diffrt serve` answers 408), a client that hung up mid-body left a traceback and
    no 499, a GET without the key got 405 where the service says 401, and a replica refused (429) requests Ray had let
    in when they could not share a batch: its queue now holds all Ray admits."""
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from diffrt.serve.app import CLIENT_CLOSED_REQUEST
    from diffrt.serve.ray_app import DiffrtDeployment, ongoing_requests

    config = ServeConfig(model=served_model, api_key_env=None, device="cpu", warmup_steps=1, max_batch_size=2, max_queue=2,
                         body_timeout_s=0.3)
    deployment = DiffrtDeployment.func_or_class(asdict(config), api_key=API_KEY)
    key = (b"authorization", f"Bearer {API_KEY}".encode())

    def request(receive, method: str = "POST", headers=(key,)) -> Request:
        return Request({"type": "http", "method": method, "path": "/v1/generate", "query_string": b"",
                        "headers": [PROXY_HOST, (b"content-type", b"application/json"), *headers]}, receive)

    async def stalled():  # part of the body, then nothing
        if not stalled.sent:
            stalled.sent = True
            return {"type": "http.request", "body": b'{"class_label"', "more_body": True}
        await asyncio.sleep(3600)
    stalled.sent = False

    async def gone():  # part of the body, then the client hangs up
        if not gone.sent:
            gone.sent = True
            return {"type": "http.request", "body": b'{"class_label"', "more_body": True}
        return {"type": "http.disconnect"}
    gone.sent = False

    async def nothing():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def answers():
        return [await deployment(request(stalled)), await deployment(request(gone)),
                await deployment(request(nothing, method="GET", headers=()))]

    try:
        slow, hung_up, keyless_get = asyncio.run(answers())
        assert slow.status_code == 408 and b"took more than 0.3 s to arrive" in slow.body
        assert hung_up.status_code == CLIENT_CLOSED_REQUEST
        assert metric(deployment.runtime.metrics.exposition().decode(), "diffrt_serve_requests_total",
                      status=str(CLIENT_CLOSED_REQUEST)) == 1
        assert keyless_get.status_code == 401
        assert deployment.runtime.batcher.max_queue == ongoing_requests(config) == 4
    finally:
        deployment.runtime.close(10)


# --- hostile clients (from a security review) ---------------------------------------------------------


def test_idle_connections_do_not_take_the_service_down(client, server):
    """uvicorn's connection cap counted sockets that sent nothing: 140 of them made every route, /healthz too,
    answer 503 for as long as they stayed open (an orchestrator would restart the pod over and over)."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(120)]
    try:
        time.sleep(0.3)
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/generate", json={"class_label": 1, "seed": 2, "num_inference_steps": 1}).status_code == 200
    finally:
        for sock in idle:
            sock.close()


@pytest.fixture(scope="module")
def guarded(served_model):
    """A service with small guards: bodies must arrive within a second, two /v1 requests at once, loopback names."""
    from diffrt.serve.app import LOOPBACK_NAMES

    config = ServeConfig(model=served_model, backend="onnxruntime", port=0, api_key_env=None, max_queue=4, device="cpu",
                         body_timeout_s=1.0, max_connections=2, allowed_hosts=LOOPBACK_NAMES,
                         allowed_origins=("https://app.example/",), log_level="warning")
    with BackgroundServer(config) as srv:
        yield srv


def _send_headers_only(url: str, length: int = 1000):
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{\"class_la" % length)
    return sock


def test_a_body_that_never_arrives_is_408_and_requests_in_flight_are_bounded(guarded):
    """A client that sent headers and part of a body held its connection, and its slot, for ever; a thousand such
    each held up to 16 MiB of body. Now the body has body_timeout_s to arrive, and requests past max_connections
    in flight are a 429 at once, while health answers."""
    slow = _send_headers_only(guarded.url)
    try:
        slow.settimeout(10)
        answer = slow.recv(4096).decode("latin-1")
        assert answer.startswith("HTTP/1.1 408") and "took more than 1 s to arrive" in answer
    finally:
        slow.close()
    holders = [_send_headers_only(guarded.url) for _ in range(2)]
    try:
        time.sleep(0.3)
        r = httpx.post(guarded.url + "/v1/generate", json={"class_label": 1, "num_inference_steps": 1}, timeout=30)
        assert r.status_code == 429 and "2 requests are in flight" in r.json()["detail"]
        assert httpx.get(guarded.url + "/healthz", timeout=30).status_code == 200
    finally:
        for sock in holders:
            sock.close()
    time.sleep(1.5)  # their bodies time out: the slots are free again
    ok = httpx.post(guarded.url + "/v1/generate", json={"class_label": 1, "num_inference_steps": 1}, timeout=60)
    assert ok.status_code == 200


def test_pages_of_another_origin_and_foreign_host_names_are_refused(guarded):
    """A web page could start generations on a loopback service with a body sent without Content-Type (no CORS
    preflight), and read its answers through DNS rebinding (evil.example pointed at 127.0.0.1)."""
    url, body = guarded.url + "/v1/generate", {"class_label": 1, "num_inference_steps": 1}
    r = httpx.post(url, content=json.dumps(body), headers={"Origin": "https://evil.example", "Content-Type": ""}, timeout=30)
    assert r.status_code == 403 and "another origin (https://evil.example)" in r.json()["detail"]
    own = "http://" + guarded.url.removeprefix("http://")
    assert httpx.post(url, json=body, headers={"Origin": own}, timeout=60).status_code == 200  # its own /docs page
    assert httpx.post(url, json=body, headers={"Origin": "https://app.example"}, timeout=60).status_code == 200  # --allowed-origin
    r = httpx.post(url, json=body, headers={"Host": "evil.example:8000", "X-Request-Id": "rebind-1"}, timeout=30)
    assert r.status_code == 421 and "'evil.example:8000' is not this service's" in r.json()["detail"]
    assert r.headers.get("x-request-id") == "rebind-1"  # every /v1 answer names its request
    # Probes and scrapers address a pod by its IP (a review's: with --allowed-host, Kubernetes restarted the pod); a
    # page rebinding its own name sends that name, which the probe routes still refuse (/readyz describes the model).
    for path in ("/healthz", "/readyz", "/metrics"):
        host, port = guarded.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:  # an HTTP/1.0 checker: no Host header
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 200"), path
        for host in ("10.1.2.3:8000", "[fd00::7]:8000"):
            assert httpx.get(guarded.url + path, headers={"Host": host}, timeout=30).status_code == 200, (path, host)
        assert httpx.get(guarded.url + path, headers={"Host": "evil.example:8000"}, timeout=30).status_code == 421, path


def test_a_body_of_many_errors_gets_a_short_answer(client):
    """20,000 unknown keys made an 8.6 MB 422, a million-entry list a 258 MB one (2.2 GB of the server's memory)."""
    r = client.post("/v1/generate", json={"class_label": 1, **{f"k{i}": 1 for i in range(20_000)}})
    assert r.status_code == 422 and len(r.content) < 5000
    # More fields than a request has: refused off the event loop before FastAPI parses it (a review's 1.35 million
    # keys held the loop, /healthz too, for 13 s), naming the first unknown ones.
    assert "the body has 20001 fields; a generate request has at most" in r.json()["detail"]
    assert "unknown: 'k0', 'k1', 'k2', ..." in r.json()["detail"]
    r = client.post("/v1/generate", json={"class_label": 1, **{f"k{i}": 1 for i in range(12)}})  # fewer: the schema's answer
    assert r.status_code == 422 and "k0, k1" in r.json()["detail"] and "and 2 more: unknown fields" in r.json()["detail"]
    r = client.post("/v1/generate", json={"class_label": 1, "controlnet_conditioning_scale": [-1] * 100_000})
    assert r.status_code == 422 and len(r.content) < 5000
    # Values nested in a field are counted too (a review's: a million keys inside one field still held the loop 0.9 s).
    r = client.post("/v1/generate", json={"class_label": 1, "color": {f"k{i}": 1 for i in range(20_000)}})
    assert r.status_code == 422 and "the body holds more than 10,000 JSON values" in r.json()["detail"]


def test_a_batch_running_past_every_deadline_fails_liveness():
    """A step longer than the request timeout (a huge size on eager PyTorch) kept /healthz green while the worker
    was deaf to every request."""
    release = threading.Event()
    batcher = Batcher(lambda jobs: (release.wait(10), {job.id: "ok" for job in jobs})[1], max_batch_size=1, max_queue=4,
                      wait_s=0, stuck_after_s=0.3)
    batcher.start()
    try:
        future = batcher.submit(Job(None, 1, "slow", deadline=time.monotonic() + 10))
        time.sleep(0.1)
        assert batcher.alive
        time.sleep(0.5)
        assert not batcher.alive and batcher.stuck
        release.set()
        assert future.result(5) == "ok" and batcher.alive
    finally:
        release.set()
        batcher.close(5)


def test_a_header_that_never_ends_is_cut_off_at_the_limit(client, server):
    """From a security review: uvicorn's httptools parser buffered a header without a limit, so ten clients each
    sending 100 MiB of one header pinned a gigabyte before any route or API key was checked. The h11 parser holds
    64 KiB of a request's head and answers past it."""
    import socket

    from diffrt.serve.app import MAX_HEADER_BYTES

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent, answer = 0, b""
        try:
            while sent < 4 * MAX_HEADER_BYTES:  # the server answers (and closes) once past the limit
                sock.sendall(b"a" * 8192)
                sent += 8192
        except OSError:
            pass
        sock.settimeout(10)
        try:
            answer = sock.recv(1024)
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]  # refused once past the limit (httptools never answered)
    assert client.get("/healthz").status_code == 200


def test_an_unconditional_model_refuses_what_it_would_not_read(uncond_model_dir):
    """A class label was refused on an unconditional model, a guidance scale taken without a word (nothing reads it:
    images equal to the call without it); `diffrt generate` refuses both (the CLI review's)."""
    from diffrt.serve.runtime import RuntimeConfig, ServeRuntime
    from diffrt.serve.schema import GenerateBody, RequestError

    runtime = ServeRuntime(RuntimeConfig(model=str(uncond_model_dir), backend="torch", device="cpu", warmup_steps=1))
    runtime.start()
    try:
        runtime.wait_ready(120)
        for field, body in (("class_label", GenerateBody(class_label=1)), ("guidance_scale", GenerateBody(guidance_scale=5.0))):
            with pytest.raises(RequestError) as refused:
                runtime.generate_sync(body)
            assert refused.value.status == 422 and refused.value.message.startswith(f"{field}: ")
            assert "this model is unconditional" in refused.value.message
        plain = runtime.generate_sync(GenerateBody(seed=3, num_inference_steps=2))
        assert plain.images == runtime.generate_sync(GenerateBody(seed=3, num_inference_steps=2, guidance_scale=1.0)).images
        import importlib.util

        if importlib.util.find_spec("gradio") is not None:  # the demo's page leaves out what such a model does not read
            from diffrt.serve.ui import make_generate

            image, latency = make_generate(runtime)(class_label=None, prompt=None, negative_prompt=None, steps=2, guidance_scale=3.0,
                                                    use_color=False, color=None, color_scale=0.0, seed=3)
            assert image is not None and "refused" not in latency, latency
    finally:
        runtime.close(10)
