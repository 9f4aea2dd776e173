"""`diffrt demo`: the shipped model, exported, sampled on the exported backend and timed against eager."""

from __future__ import annotations

from PIL import Image

from diffrt.demo import DemoSettings, format_table, run_demo


def test_demo_writes_a_grid_and_a_timing_table_from_the_same_run(shipped_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cache"))  # a cold cache: the export runs
    settings = DemoSettings(num_inference_steps=6, repeats=1)
    path, timings, max_diff = run_demo(tmp_path / "demo.png", backend="onnxruntime", settings=settings)

    grid = Image.open(path)
    cell = 16 * 4 + 2  # 16 px digits drawn 4x, 2 px padding
    assert grid.size == (len(settings.colours) * cell + 2, 10 * cell + 2)  # one row per digit, one column per colour
    assert [t.backend for t in timings] == ["onnxruntime", "torch"]
    assert all(t.ms_per_step > 0 and t.ms_per_image > 0 for t in timings)
    assert max_diff <= 5e-3  # the exported model draws what eager draws
    table = format_table(timings)
    eager, fast = timings[1], timings[0]
    assert f"{eager.ms_per_step / fast.ms_per_step:.2f}x" in table
    assert any(p.name == "manifest.json" for p in (tmp_path / "cache").rglob("manifest.json"))


def test_an_out_the_demo_cannot_write_is_refused_before_it_samples(tmp_path):
    """The bug: --out naming a folder failed with IsADirectoryError after the whole demo ran; --out d.jpg wrote a PNG."""
    import pytest

    from diffrt.demo import run_demo
    from diffrt.errors import DiffrtError

    for out, words in ((tmp_path, "it is a folder"), (tmp_path / "d.jpg", "must be a .png file")):
        with pytest.raises(DiffrtError, match=words):
            run_demo(out)


def test_the_demo_times_both_backends_on_the_same_threads(shipped_model_dir, tmp_path, monkeypatch):
    """From a review: ONNX Runtime sizes its pool from PyTorch's threads when its sessions are made, and the demo
    made them before it set the run's threads: with OMP_NUM_THREADS=1, one thread timed against eager's two."""
    import torch

    from diffrt.bench.timing import bench_threads
    from diffrt.runtime.backends import onnxruntime as ort_backend

    pools = []
    real_init = ort_backend.OnnxRuntimeBackend.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        pools.append(self.session.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "__init__", spy)
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFRT_BENCH_THREADS", raising=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 leaves it; the demo's run takes every CPU
        run_demo(tmp_path / "demo.png", backend="onnxruntime", settings=DemoSettings(num_inference_steps=2, repeats=1))
    finally:
        torch.set_num_threads(old)
    assert pools and set(pools) == {bench_threads()}
