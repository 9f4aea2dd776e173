"""pytest-benchmark view of the CPU configurations: one UNet call and one loop step, per backend.

    pytest benchmarks/test_bench_pipeline.py --benchmark-enable [--benchmark-json out.json]

Without --benchmark-enable (the project's default) each benchmark runs once, as a smoke test.
`diffrt bench` is the full report (end to end, components, memory, targets); this file is for
comparing two commits with pytest-benchmark's own tooling (`--benchmark-compare`).
"""

from __future__ import annotations

import pytest
import torch

from diffrt.bench.configs import CONFIGS
from diffrt.bench.timing import cpu_threads
from diffrt.runtime.backends import backend_available

DIGITS = CONFIGS["digits"]
TINY = CONFIGS["tiny-t2i-controlnet"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for PyTorch and ONNX Runtime alike: stable numbers on a shared 2-core machine
    (see benchmarks/README.md). ONNX Runtime sizes its pool when a session opens, so the
    backends open inside this."""
    with cpu_threads(1):
        yield


def _backends(*names):
    return [pytest.param(n, marks=pytest.mark.skipif(not backend_available(n), reason=f"{n} not available")) for n in names]


@pytest.mark.parametrize("backend", _backends("torch", "onnxruntime"))
def test_digits_unet_call(benchmark, backend):
    """The shipped digits UNet at the demo's batch: 80 images x 2 CFG branches."""
    unet = DIGITS.open(backend, CPU).pipeline.unet
    feed = unet.spec.example_feed(batch=2 * DIGITS.num_images)
    out = benchmark.pedantic(unet.run, args=(feed,), warmup_rounds=1, rounds=5, iterations=1)
    assert out["noise_pred"].shape == feed["sample"].shape


@pytest.mark.parametrize("backend", _backends("torch", "onnxruntime"))
def test_tiny_t2i_unet_controlnet_call(benchmark, backend):
    """diffrt.tiny's UNet fused with its ControlNet, batch 2 (CFG), 64x64 images."""
    TINY.prepare(CPU)
    unet = TINY.open(backend, CPU).pipeline.unet
    latent = TINY.size // 8
    feed = unet.spec.example_feed(batch=2, height=latent, width=latent, image_height=TINY.size, image_width=TINY.size)
    out = benchmark.pedantic(unet.run, args=(feed,), warmup_rounds=2, rounds=20, iterations=1)
    assert out["noise_pred"].shape == feed["sample"].shape


def test_digits_loop_step(benchmark):
    """The loop's own work for the demo's request (CFG combine, colour guidance, DDIM step), model calls excluded:
    the request with zero-returning backends, per run of 25 steps."""
    work = DIGITS.open_null(CPU)
    images = benchmark.pedantic(work.run, args=(DIGITS.num_inference_steps,), warmup_rounds=1, rounds=5, iterations=1)
    assert images.shape[0] == DIGITS.num_images
