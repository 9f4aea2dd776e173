"""`diffrt bench` on a tiny class-conditioned model: files, fields, and speed-ups computed from the same run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffrt.bench import run_bench
from diffrt.bench.cells import CellOptions, measure_cell_isolated
from diffrt.bench.configs import CONFIGS, DigitsConfig, NullBackend
from diffrt.bench.report import markdown
from diffrt.bench.timing import summarize_ms
from diffrt.components import pixel_unet_spec, vae_decoder_spec
from diffrt.runtime.backends import backend_available

STATUSES = {"ok", "skipped", "not applicable", "error"}
TARGET_STATUSES = {"met", "not met", "not measured", "measured elsewhere"}


@pytest.fixture
def tiny_configs(classemb_model_dir, monkeypatch):
    """The digits configuration's code path on the 4-class test model: 4 images (1 colour), 3 steps."""
    guided = DigitsConfig("test-digits", "4 classes x 1 colour, colour guidance", num_images=4, num_inference_steps=3,
                          guidance_scale=3.0, model=classemb_model_dir, colours=("#ff3b30",), unguided="test-digits-unguided",
                          backends=("torch", "onnxruntime", "tensorrt", "optimum-onnxruntime"))
    unguided = dataclasses.replace(guided, name="test-digits-unguided", colour_guidance=False, unguided=None,
                                   backends=("onnxruntime",), eager_baseline=False)
    monkeypatch.setitem(CONFIGS, guided.name, guided)
    monkeypatch.setitem(CONFIGS, unguided.name, unguided)
    return guided, unguided


def test_summarize_ms_median_p90_min():
    stats = summarize_ms([0.4, 0.1, 0.2, 0.3], per=2)
    assert stats == {"median_ms": 125.0, "p90_ms": 200.0, "min_ms": 50.0, "n": 4}
    assert summarize_ms([]) is None


def test_null_backend_returns_zeros_of_the_output_shapes():
    unet = NullBackend(pixel_unet_spec(3, 16, True, num_labels=5), torch.device("cpu"))
    out = unet.run(unet.spec.example_feed(batch=6))
    assert out["noise_pred"].shape == (6, 3, 16, 16) and not out["noise_pred"].any()
    vae = NullBackend(vae_decoder_spec(4, batch=(1, 1, 2), height=(4, 4, 8), width=(4, 4, 8)), torch.device("cpu"))
    assert vae.run({"latent": torch.randn(2, 4, 8, 4)})["image"].shape == (2, 3, 64, 32)


def test_run_bench_writes_json_markdown_and_png(tmp_path, tiny_configs):
    paths = run_bench(out_dir=tmp_path, repeats=1, configs=["test-digits", "test-digits-unguided"], threads=1, kernels=False)
    by_suffix = {p.suffix: p for p in paths}
    assert set(by_suffix) == {".json", ".md", ".png"} and all(p.parent == tmp_path for p in paths)
    assert by_suffix[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(by_suffix[".json"].read_text())

    # The machine, versions and settings are recorded.
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu"]
    assert report["versions"]["torch"] == torch.__version__ and "onnxruntime" in report["versions"]
    assert report["settings"]["repeats"] == 1 and report["settings"]["configs"]["test-digits"]["num_images"] == 4
    assert by_suffix[".json"].name == f"bench_{report['machine_tag']}.json"

    rows = {(r["config"], r["backend"]): r for r in report["results"]}
    assert all(r["status"] in STATUSES for r in rows.values())
    eager = rows[("test-digits", "torch")]
    assert eager["status"] == "ok", eager
    assert ("test-digits-unguided", "torch") not in rows  # eager_baseline=False
    if not torch.cuda.is_available():
        assert rows[("test-digits", "tensorrt")]["status"] == "skipped" and "CUDA" in rows[("test-digits", "tensorrt")]["reason"]
    # A pixel model: optimum has no pipeline for it, installed or not (DigitsConfig.open says so before importing it).
    optimum = rows[("test-digits", "optimum-onnxruntime")]
    assert optimum["status"] == "not applicable" and "class-conditioned pixel-space UNet2DModel" in optimum["reason"], optimum
    ok = [r for r in rows.values() if r["status"] == "ok"]
    for r in ok:
        e2e = r["end_to_end_per_image"]
        assert e2e["min_ms"] <= e2e["median_ms"] <= e2e["p90_ms"] and e2e["n"] == r["runs"] == 1
        assert r["images_per_s"] == pytest.approx(4 * 1000.0 / (e2e["median_ms"] * 4), rel=1e-6)
        unet = r["components"]["unet"]
        assert unet["calls_per_run"] == 3 and unet["median_ms"] > 0  # one UNet call per step, timed in place
        assert r["outside_models_ms_per_image"] == pytest.approx(e2e["median_ms"] - unet["median_ms"] * 3 / 4)
        assert r["memory"]["peak_mb"] is not None and r["memory"]["method"]
    # Speed-ups come from this run's eager cell, not from anywhere else.
    for r in ok:
        if r["config"] != "test-digits":
            continue
        assert r["eager_median_ms_per_image"] == eager["end_to_end_per_image"]["median_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(eager["end_to_end_per_image"]["median_ms"] / r["end_to_end_per_image"]["median_ms"])
        assert isinstance(r["matches_eager"], bool) and r["max_abs_diff_vs_eager"] >= 0
    assert eager["speedup_vs_eager"] == 1.0 and eager["max_abs_diff_vs_eager"] == 0.0
    if backend_available("onnxruntime"):
        ort = rows[("test-digits", "onnxruntime")]
        assert ort["status"] == "ok" and ort["matches_eager"], ort

    # Loop overhead, and every target reported with a status.
    loops = {o["config"]: o for o in report["loop_overhead"]}
    assert loops["test-digits"]["status"] == "ok" and loops["test-digits"]["ms_per_step"] > 0
    assert loops["test-digits"]["share_of_eager_step"] == pytest.approx(loops["test-digits"]["ms_per_step"] / eager["ms_per_step"])
    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == {"cpu_exported_vs_eager", "h100_tensorrt_vs_eager", "colour_guidance_overhead", "fused_kernels"}
    assert all(t["status"] in TARGET_STATUSES for t in targets.values())
    if backend_available("onnxruntime"):
        overhead = targets["colour_guidance_overhead"]["values"]
        assert set(overhead["end_to_end"]) == set(overhead["outside_model_calls"]) == {"test-digits/onnxruntime"}

    # The table is the JSON's: one row per cell, the same speed-up.
    md = by_suffix[".md"].read_text()
    assert md == markdown(report)
    assert "| config | backend | status |" in md and md.count("| test-digits") == len(rows) + len(loops)
    if backend_available("onnxruntime"):
        assert f"{rows[('test-digits', 'onnxruntime')]['speedup_vs_eager']:.2f}x" in md


def test_unknown_config_or_backend_is_a_clear_error(tmp_path):
    from diffrt.errors import DiffrtError

    with pytest.raises(DiffrtError, match="known:"):
        run_bench(out_dir=tmp_path, configs=["no-such-config"])
    with pytest.raises(DiffrtError, match="known:"):
        run_bench(out_dir=tmp_path, backends=["no-such-backend"], configs=["digits"])


def test_isolated_cell_past_its_time_limit_is_skipped_with_a_reason(tiny_configs):
    guided, _ = tiny_configs
    result, images = measure_cell_isolated(guided, "torch-compile", torch.device("cpu"), CellOptions(repeats=1),
                                           threads=1, timeout_s=0.2)
    assert result["status"] == "skipped" and "within" in result["reason"] and images is None
    result, _ = measure_cell_isolated(guided, "torch-compile", torch.device("cpu"), CellOptions(repeats=1), threads=1, timeout_s=0)
    assert result["status"] == "skipped" and "budget" in result["reason"]
