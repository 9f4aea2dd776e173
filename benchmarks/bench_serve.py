"""Throughput and latency of `diffrt serve` on this machine, over real HTTP on loopback.

    python benchmarks/bench_serve.py [--model DIR] [--backend onnxruntime] [--steps 25]
                                     [--concurrency 1 4 8] [--requests 16] [--guidance-scale 3.0] [--triton]

Starts the real service (uvicorn in a thread, 127.0.0.1, a free port) over the shipped digits
model, then for each client concurrency sends `--requests x concurrency` single-image requests
(distinct seeds and labels, 25 DDIM steps, `--guidance-scale` sent with every request and used
for the direct calls, so all rows run the same work) from that many client threads, each waiting
for its answer before sending the next. Reported per level: requests/s over the wall time, p50
and the tail latency, the mean images per UNet batch (from the service's own /metrics), and the
refusals (429) if any. The tail is p99 where a level has 100 answers or more; with fewer it is
the slowest (nearest rank: p99 of 64 samples is the maximum), and the row says "max".

The pipeline called directly (one image at a time, the same labels, seeds and guidance) and the
service with one client alternate request by request, so the HTTP + queue overhead is read off
pairs measured moments apart (`overhead_ms` in the one-client row: the median of served minus
direct per pair). Both run with the same threads: DIFFRT_BENCH_THREADS, else every CPU the
process may use, pinned as `diffrt bench` pins them (Triton, a separate process, is not pinned).
With --triton, the same levels run again against Triton Inference Server over a repository that
`diffrt triton-repo` writes for the same model (KServe v2: JSON in, the images back as raw uint8
binary data where the service answers with a PNG; `make tritonserver`), so the two front ends are
compared in one run; there the batch column is Triton's requests per execute, which the runtime
inside batches as `diffrt serve` does.

Writes benchmarks/results/serve_cpu.json (serve_cuda.json with a GPU) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from diffrt import atomic
from diffrt.bench.provenance import finish, run_metadata
from diffrt.bench.timing import bench_threads, cpu_threads
from diffrt.serve.app import BackgroundServer, ServeConfig

RESULTS = Path(__file__).parent / "results"


P99_MIN_SAMPLES = 100  # below this, the nearest-rank p99 is the maximum: the row says "max"


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank, as `diffrt bench` (summarize_ms): the smallest sample with at least q % of them at or below it."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_stats(samples: list[float]) -> dict:
    """p50 and the tail in ms: p99 from 100 samples on, the maximum (so labelled) below that."""
    if not samples:
        return {"p50_ms": None, "tail": None, "tail_ms": None, "p99_ms": None, "max_ms": None}
    tail = "p99" if len(samples) >= P99_MIN_SAMPLES else "max"
    p99 = 1000 * percentile(samples, 99) if tail == "p99" else None
    return {"p50_ms": 1000 * percentile(samples, 50), "tail": tail, "tail_ms": p99 if p99 is not None else 1000 * max(samples),
            "p99_ms": p99, "max_ms": 1000 * max(samples)}


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


class ServeFront:
    """`diffrt serve`: POST /v1/generate; batches from its /metrics."""

    name = "serve"

    def __init__(self, client: httpx.Client):
        self.client = client

    def send(self, body: dict) -> int:
        return self.client.post("/v1/generate", json=body).status_code

    def batches(self) -> tuple[float, float]:
        """(batches run, images in them) so far."""
        text = self.client.get("/metrics").text
        return metric_sum(text, "diffrt_serve_batch_size_count"), metric_sum(text, "diffrt_serve_batch_size_sum")


class TritonFront:
    """Triton Inference Server: KServe v2 JSON inference; batches from the model's statistics."""

    name = "triton"

    def __init__(self, client: httpx.Client, model: str):
        self.client, self.model = client, model

    def send(self, body: dict) -> int:
        """The images come back as binary tensor data (what tritonclient asks for), the service's as a PNG."""
        inputs = [{"name": key, "shape": [1, 1], "datatype": "FP64" if isinstance(value, float) else "INT64", "data": [value]}
                  for key, value in body.items()]
        outputs = [{"name": "images", "parameters": {"binary_data": True}}, {"name": "seed"}]
        r = self.client.post(f"/v2/models/{self.model}/infer", json={"inputs": inputs, "outputs": outputs})
        return r.status_code

    def batches(self) -> tuple[float, float]:
        stats = self.client.get(f"/v2/models/{self.model}/stats").json()["model_stats"][0]
        return float(stats["execution_count"]), float(stats["inference_count"])


def request_body(i: int, steps: int, guidance_scale: float, num_classes: int, seed0: int) -> dict:
    """Request i of a level: its label and seed, and the guidance scale sent explicitly (the service's default is 2.0)."""
    return {"class_label": i % num_classes, "seed": seed0 + i, "num_inference_steps": steps, "guidance_scale": float(guidance_scale)}


def run_level(front, concurrency: int, n_requests: int, steps: int, num_classes: int, seed0: int, guidance_scale: float) -> dict:
    batches0, images0 = front.batches()
    latencies, statuses = [], []

    def one(i: int) -> None:
        body = request_body(i, steps, guidance_scale, num_classes, seed0)
        t0 = time.perf_counter()
        status = front.send(body)
        if status == 200:
            latencies.append(time.perf_counter() - t0)
        statuses.append(status)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    batches1, images1 = front.batches()
    batches, images = batches1 - batches0, images1 - images0
    ok = statuses.count(200)
    return {"front": front.name, "concurrency": concurrency, "requests": n_requests, "ok": ok, "refused_429": statuses.count(429),
            "other_errors": n_requests - ok - statuses.count(429), "wall_s": wall, "requests_per_s": ok / wall,
            **latency_stats(latencies), "mean_batch_images": images / batches if batches else 0.0}


def open_direct(model: str | None, backend: str, device: str, steps: int, guidance_scale: float, num_classes: int):
    """The pipeline alone, batch 1, no HTTP and no queue: the floor the service adds to. A pipeline
    of its own: the service's pipeline belongs to its worker thread. Returns run(body) -> seconds."""
    from diffrt.runtime.loading import open_pixel_pipeline

    pipe = open_pixel_pipeline(model, backend, device)
    conditioned = pipe.info.conditioning != "none"

    def run(body: dict) -> float:
        t0 = time.perf_counter()
        pipe([body["class_label"]] if conditioned else None, num_images=None if conditioned else 1, num_inference_steps=steps,
             guidance_scale=body["guidance_scale"], seed=body["seed"], output_type="np")  # on the host, finished, as
        return time.perf_counter() - t0  # the service's images are before it encodes them (CUDA runs ahead of "pt")

    run(request_body(0, steps, guidance_scale, num_classes, seed0=0))  # warm-up
    return run


def direct_and_served(run_direct, front, n: int, steps: int, guidance_scale: float, num_classes: int, seed0: int) -> list[dict]:
    """The same n requests called directly and sent to the service with one client, alternating
    (direct, served, served, direct, ...), so a change in the machine's load lands on both rows."""
    batches0, images0 = front.batches()
    direct, served, statuses = [], [], []
    for i in range(n):
        body = request_body(i, steps, guidance_scale, num_classes, seed0)

        def send() -> None:
            t0 = time.perf_counter()
            status = front.send(body)
            statuses.append(status)
            if status == 200:
                served.append(time.perf_counter() - t0)

        def call() -> None:
            direct.append(run_direct(body))

        for step in ((call, send) if i % 2 == 0 else (send, call)):
            step()
    batches1, images1 = front.batches()
    batches, images = batches1 - batches0, images1 - images0
    ok = statuses.count(200)
    pairs = [1000 * (s - d) for s, d in zip(served, direct)] if ok == n else []
    direct_row = {"front": "pipeline", "concurrency": "direct", "requests": n, "ok": n, "refused_429": 0, "other_errors": 0,
                  "wall_s": sum(direct), "requests_per_s": n / sum(direct), **latency_stats(direct), "mean_batch_images": 1.0,
                  "alternated_with": f"{front.name}, 1 client"}
    served_row = {"front": front.name, "concurrency": 1, "requests": n, "ok": ok, "refused_429": statuses.count(429),
                  "other_errors": n - ok - statuses.count(429), "wall_s": sum(served),
                  "requests_per_s": ok / sum(served) if served else 0.0, **latency_stats(served),
                  "mean_batch_images": images / batches if batches else 0.0, "alternated_with": "pipeline, direct",
                  "overhead_ms": statistics.median(pairs) if pairs else None}
    return [direct_row, served_row]


def format_table(rows: list[dict]) -> str:
    head = f"{'front':>8} {'clients':>8} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'tail ms':>13} {'imgs/batch':>10} {'429':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tail = f"{r['tail_ms']:.1f} ({r['tail']})" if r["tail_ms"] is not None else "–"
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "–"
        lines.append(f"{r['front']:>8} {r['concurrency']!s:>8} {r['ok']:>8} {r['requests_per_s']:>7.2f} {p50:>8} "
                     f"{tail:>13} {r['mean_batch_images']:>10.2f} {r['refused_429']:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model or artifact folder (default: the shipped digits model)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="sent with every request and used for the direct calls")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per client at each level")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--triton", action="store_true", help="also run the levels against Triton Inference Server (`make tritonserver`)")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/serve_<device>.json)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = bench_threads()
    meta = run_metadata(threads)
    config = ServeConfig(model=args.model, backend=args.backend, port=0, api_key_env=None, device=device,
                         max_batch_size=args.max_batch_size, max_queue=max(64, 2 * max(args.concurrency)),
                         batch_wait_ms=args.batch_wait_ms, timeout_s=120, log_level="warning")
    # The same threads for the direct pipeline and the service (in this process); both open their
    # ONNX Runtime sessions inside, which size their pools from the CPUs the process may use.
    with cpu_threads(threads):
        t0 = time.perf_counter()
        with BackgroundServer(config, ready_timeout=600) as srv:
            startup = time.perf_counter() - t0
            info = srv.runtime.describe()
            num_classes = max(1, info["num_classes"])
            run_direct = open_direct(args.model, args.backend, device, args.steps, args.guidance_scale, num_classes)
            with httpx.Client(base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=max(args.concurrency) + 4)) as client:
                front = ServeFront(client)
                run_level(front, 1, 4, args.steps, num_classes, seed0=0, guidance_scale=args.guidance_scale)  # warm the HTTP path
                rows = direct_and_served(run_direct, front, max(8, args.requests), args.steps, args.guidance_scale, num_classes, seed0=1)
                rows += run_levels(front, args, num_classes, skip_one=True)
    triton_startup = None
    if args.triton:
        triton_rows, triton_startup = run_triton(args, device, num_classes)
        rows += triton_rows
    result = {
        "benchmark": "serve", "model": args.model or "shipped:digits", "backend": info["backend"], "device": device,
        "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
        "guidance_scale_note": "sent in every request and used for the direct calls",
        "image": f"{info['channels']}x{info['sample_size']}x{info['sample_size']}",
        "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "startup_s": startup,
        "triton_startup_s": triton_startup, "threads": threads, "threads_note": "the direct pipeline and diffrt serve; Triton unpinned",
        "tail_note": f"tail_ms is p99 where a row has >= {P99_MIN_SAMPLES} answers, else the maximum (tail: \"max\")",
        "provenance": finish(meta),
        "machine": {"cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],  # other work on the machine skews the numbers
                    "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"serve_{device}.json"
    atomic.write_json(out, result)
    print(f"diffrt serve: {result['model']} on {info['backend']} ({device}), {args.steps} DDIM steps, "
          f"guidance {args.guidance_scale:g}, {result['image']} images, max batch {args.max_batch_size}, wait {args.batch_wait_ms:g} ms, "
          f"{threads} threads")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


def run_levels(front, args, num_classes: int, skip_one: bool = False) -> list[dict]:
    """Every --concurrency level (the one-client level left out where it ran alternating with the direct calls)."""
    if not skip_one:
        run_level(front, 1, 4, args.steps, num_classes, seed0=0, guidance_scale=args.guidance_scale)  # warm the HTTP path
    return [run_level(front, c, c * args.requests, args.steps, num_classes, seed0=10_000 * (level + 1), guidance_scale=args.guidance_scale)
            for level, c in enumerate(args.concurrency) if not (skip_one and c == 1)]


def run_triton(args, device: str, num_classes: int) -> tuple[list[dict], float]:
    """The same levels against tritonserver over `diffrt triton-repo`'s repository for the same
    model and settings (its dynamic batcher waits what the service's batcher waits)."""
    import tempfile

    from diffrt.serve.triton_repo import RepositoryConfig, write_repository
    from diffrt.serve.triton_server import LocalTritonServer

    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp) / "repo", RepositoryConfig(
            model=args.model, backend=args.backend, device=device, max_batch_size=args.max_batch_size,
            queue_delay_ms=args.batch_wait_ms, max_queue=max(64, 2 * max(args.concurrency)), timeout_s=120)).parent
        t0 = time.perf_counter()
        with LocalTritonServer(repo) as server:
            startup = time.perf_counter() - t0
            with httpx.Client(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=max(args.concurrency) + 4)) as client:
                return run_levels(TritonFront(client, "diffrt"), args, num_classes), startup


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
