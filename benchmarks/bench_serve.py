"""Throughput and latency of `diffrt serve` on this machine, over real HTTP on loopback.

    python benchmarks/bench_serve.py [--model DIR] [--backend onnxruntime] [--steps 25]
                                     [--concurrency 1 4 8] [--requests 16] [--triton]

Starts the real service (uvicorn in a thread, 127.0.0.1, a free port) over the shipped digits
model, then for each client concurrency sends `--requests x concurrency` single-image requests
(distinct seeds and labels, `diffrt generate`'s default 25 DDIM steps and guidance 3.0) from that
many client threads, each waiting for its answer before sending the next. Reported per level:
requests/s over the wall time, p50/p99 end-to-end latency, the mean images per UNet batch
(from the service's own /metrics), and the refusals (429) if any. A first row times the
pipeline called directly, one image at a time, so the HTTP + queue overhead can be read off.
With --triton, the same levels run again against Triton Inference Server over a repository that
`diffrt triton-repo` writes for the same model (KServe v2: JSON in, the images back as raw uint8
binary data where the service answers with a PNG; `make tritonserver`), so the two front ends are
compared in one run; there the batch column is Triton's requests per execute, which the runtime
inside batches as `diffrt serve` does.

Writes benchmarks/results/serve_cpu.json (serve_cuda.json with a GPU) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from diffrt.serve.app import BackgroundServer, ServeConfig

RESULTS = Path(__file__).parent / "results"


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 100 samples is the 99th)."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


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
        inputs = [{"name": key, "shape": [1, 1], "datatype": "INT64", "data": [value]} for key, value in body.items()]
        outputs = [{"name": "images", "parameters": {"binary_data": True}}, {"name": "seed"}]
        r = self.client.post(f"/v2/models/{self.model}/infer", json={"inputs": inputs, "outputs": outputs})
        return r.status_code

    def batches(self) -> tuple[float, float]:
        stats = self.client.get(f"/v2/models/{self.model}/stats").json()["model_stats"][0]
        return float(stats["execution_count"]), float(stats["inference_count"])


def run_level(front, concurrency: int, n_requests: int, steps: int, num_classes: int, seed0: int) -> dict:
    batches0, images0 = front.batches()
    latencies, statuses = [], []

    def one(i: int) -> None:
        body = {"class_label": i % num_classes, "seed": seed0 + i, "num_inference_steps": steps}
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
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "mean_batch_images": images / batches if batches else 0.0}


def direct_pipeline(model: str | None, backend: str, device: str, steps: int, n: int) -> dict:
    """The pipeline alone, batch 1, no HTTP and no queue: the floor the service adds to. A pipeline
    of its own: the service's pipeline belongs to its worker thread."""
    from diffrt.runtime.loading import open_pixel_pipeline

    pipe = open_pixel_pipeline(model, backend, device)
    labels = [0] if pipe.info.conditioning != "none" else None
    run = lambda seed: pipe(labels, num_images=None if labels else 1, num_inference_steps=steps, guidance_scale=3.0,  # noqa: E731
                            seed=seed, output_type="pt")
    run(0)  # warm-up
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        run(i)
        samples.append(time.perf_counter() - t0)
    total = sum(samples)
    return {"front": "pipeline", "concurrency": "direct", "requests": n, "ok": n, "refused_429": 0, "other_errors": 0, "wall_s": total,
            "requests_per_s": n / total, "p50_ms": 1000 * percentile(samples, 50), "p99_ms": 1000 * percentile(samples, 99),
            "mean_batch_images": 1.0}


def format_table(rows: list[dict]) -> str:
    head = f"{'front':>8} {'clients':>8} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'imgs/batch':>10} {'429':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['front']:>8} {r['concurrency']!s:>8} {r['ok']:>8} {r['requests_per_s']:>7.2f} {r['p50_ms']:>8.1f} "
                     f"{r['p99_ms']:>8.1f} {r['mean_batch_images']:>10.2f} {r['refused_429']:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model or artifact folder (default: the shipped digits model)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per client at each level")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--triton", action="store_true", help="also run the levels against Triton Inference Server (`make tritonserver`)")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/serve_<device>.json)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ServeConfig(model=args.model, backend=args.backend, port=0, api_key_env=None, device=device,
                         max_batch_size=args.max_batch_size, max_queue=max(64, 2 * max(args.concurrency)),
                         batch_wait_ms=args.batch_wait_ms, timeout_s=120, log_level="warning")
    rows = [direct_pipeline(args.model, args.backend, device, args.steps, n=max(8, args.requests // 2))]
    t0 = time.perf_counter()
    with BackgroundServer(config, ready_timeout=600) as srv:
        startup = time.perf_counter() - t0
        info = srv.runtime.describe()
        with httpx.Client(base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=max(args.concurrency) + 4)) as client:
            rows += run_levels(ServeFront(client), args, max(1, info["num_classes"]))
    triton_startup = None
    if args.triton:
        triton_rows, triton_startup = run_triton(args, device, max(1, info["num_classes"]))
        rows += triton_rows
    result = {
        "benchmark": "serve", "model": args.model or "shipped:digits", "backend": info["backend"], "device": device,
        "num_inference_steps": args.steps, "guidance_scale": 3.0, "image": f"{info['channels']}x{info['sample_size']}x{info['sample_size']}",
        "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "startup_s": startup,
        "triton_startup_s": triton_startup,
        "machine": {"cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],  # other work on the machine skews the numbers
                    "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"serve_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"diffrt serve: {result['model']} on {info['backend']} ({device}), {args.steps} DDIM steps, "
          f"guidance 3.0, {result['image']} images, max batch {args.max_batch_size}, wait {args.batch_wait_ms:g} ms")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


def run_levels(front, args, num_classes: int) -> list[dict]:
    run_level(front, 1, 4, args.steps, num_classes, seed0=0)  # warm the HTTP path
    return [run_level(front, c, c * args.requests, args.steps, num_classes, seed0=10_000 * (level + 1))
            for level, c in enumerate(args.concurrency)]


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
