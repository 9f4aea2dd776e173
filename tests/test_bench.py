"""`diffrt bench` on a tiny class-conditioned model: files, fields, and speed-ups computed from the same run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

import diffrt.bench
from diffrt.bench import _compare_with_eager, cells, run_bench, timing
from diffrt.bench.cells import CellOptions, measure_cell_isolated, skipped
from diffrt.bench.configs import CONFIGS, BenchConfig, DigitsConfig, NullBackend
from diffrt.bench.report import chart, markdown
from diffrt.bench.timing import bench_threads, cpu_threads, summarize_ms
from diffrt.components import pixel_unet_spec, vae_decoder_spec
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import backend_available

STATUSES = {"ok", "skipped", "not applicable", "error"}
TARGET_STATUSES = {"met", "not met", "not measured", "measured elsewhere", "not resolved"}


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


def test_results_record_what_tells_two_cpus_of_one_name_apart(tmp_path, monkeypatch):
    """From a review: two hosts both read "AMD EPYC", 2 CPUs, in the committed results, a 2x apart in speed; family,
    model, stepping and the instruction sets the kernels use are recorded (the first processor's)."""
    from diffrt.bench import provenance, timing

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nstepping\t: 1\n"
                    "flags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 49\nstepping\t: 0\nflags\t\t: fpu\n")
    monkeypatch.setattr(timing, "CPUINFO", info)
    expected = {"family": "25", "model": "17", "stepping": "1", "isa": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    assert timing.cpu_identity() == expected
    assert provenance.run_metadata(1)["cpu_identity"] == expected
    assert timing.machine_info(torch.device("cpu"), 1)["cpu_identity"] == expected
    monkeypatch.setattr(timing, "CPUINFO", tmp_path / "none")
    assert timing.cpu_identity() is None


def test_only_the_default_run_writes_the_machines_own_file_name():
    from diffrt.bench import report_stem

    default = ("digits", "tiny-t2i-controlnet")
    assert report_stem("cpu-x-2c", None, None, default) == report_stem("cpu-x-2c", list(default), None, default) == "bench_cpu-x-2c"
    assert report_stem("cpu-x-2c", ["tiny-t2i-controlnet"], None, default) == "bench_cpu-x-2c_tiny-t2i-controlnet"
    assert report_stem("cpu-x-2c", None, ["torch"], default) == "bench_cpu-x-2c_torch"


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
    paths = run_bench(out_dir=tmp_path, repeats=1, configs=["test-digits", "test-digits-unguided"], threads=1, kernels=False,
                      min_time_s=0)
    by_suffix = {p.suffix: p for p in paths}
    assert set(by_suffix) == {".json", ".md", ".png"} and all(p.parent == tmp_path for p in paths)
    assert by_suffix[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(by_suffix[".json"].read_text())

    # The machine, versions and settings are recorded.
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu"]
    assert report["versions"]["torch"] == torch.__version__ and "onnxruntime" in report["versions"]
    assert report["settings"]["repeats"] == 1 and report["settings"]["configs"]["test-digits"]["num_images"] == 4
    # A run of chosen configurations is named after them: it never replaces the default run's files.
    assert by_suffix[".json"].name == f"bench_{report['machine_tag']}_test-digits_test-digits-unguided.json"
    # Where the numbers come from: the commit, and the load at both ends.
    prov = report["provenance"]
    assert prov["diffrt"] and prov["threads"] == 1 and "commit" in prov and "dirty" in prov
    assert prov["load_average_1min_at_start"] is not None and prov["load_average_1min_at_end"] is not None
    assert "load_average_1min_at_end" in report["machine"] and report["partial"] is None

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
        if r is eager:
            continue
        # Eager and the backend alternated in rounds: the speed-up is the median of the per-round ratios.
        assert r["round_group"] == eager["round_group"] == "test-digits+test-digits-unguided"
        ratios = [e / b for e, b in zip(eager["run_s"], r["run_s"])]
        assert r["speedup_vs_eager"] == pytest.approx(sorted(ratios)[len(ratios) // 2])
        assert r["speedup_spread"]["min"] <= r["speedup_vs_eager"] <= r["speedup_spread"]["max"]
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
        assert set(overhead["end_to_end"]) == set(overhead["outside_model_calls"]) == set(overhead["spread"]) == {"test-digits/onnxruntime"}
        # The unguided twin ran its request on the guided cell's pipeline, in the same rounds.
        assert rows[("test-digits-unguided", "onnxruntime")]["shares_pipeline_with"] == "test-digits"

    # The table is the JSON's: one row per cell, the same speed-up.
    md = by_suffix[".md"].read_text()
    assert md == markdown(report)
    assert "| config | backend | status |" in md and md.count("| test-digits") == len(rows) + len(loops)
    assert md.count("(export made)") == 2 * sum(bool(r.get("export_made")) for r in rows.values())  # setup and peak
    if backend_available("onnxruntime"):
        assert f"{rows[('test-digits', 'onnxruntime')]['speedup_vs_eager']:.2f}x" in md
        # The twin's peak is above a baseline that holds the shared pipeline: the table says so beside the figure.
        assert "(on test-digits's pipeline)" in md


def test_unknown_config_or_backend_is_a_clear_error(tmp_path):
    from diffrt.errors import DiffrtError

    with pytest.raises(DiffrtError, match="known:"):
        run_bench(out_dir=tmp_path, configs=["no-such-config"])
    with pytest.raises(DiffrtError, match="known:"):
        run_bench(out_dir=tmp_path, backends=["no-such-backend"], configs=["digits"])
    # A backend asked for by name that cannot run here, and an --out that cannot hold the results: refused before
    # anything is measured (both ran minutes of eager rounds first, the one as a "skipped" row, the other to fail).
    if not backend_available("tensorrt"):
        with pytest.raises(DiffrtError, match="backend 'tensorrt' is not available"):
            run_bench(out_dir=tmp_path, backends=["torch", "tensorrt"], configs=["digits"])
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DiffrtError, match="a.png is a file; give the folder"):
        run_bench(out_dir=tmp_path / "a.png", configs=["digits"])
    with pytest.raises(DiffrtError, match="cannot make the folder"):
        run_bench(out_dir=tmp_path / "a.png" / "under", configs=["digits"])


def test_isolated_cell_past_its_time_limit_is_skipped_with_a_reason(tiny_configs):
    guided, _ = tiny_configs
    result, images = measure_cell_isolated(guided, "torch-compile", torch.device("cpu"), CellOptions(repeats=1),
                                           threads=1, timeout_s=0.2)
    assert result["status"] == "skipped" and "within" in result["reason"] and images is None
    result, _ = measure_cell_isolated(guided, "torch-compile", torch.device("cpu"), CellOptions(repeats=1), threads=1, timeout_s=0)
    assert result["status"] == "skipped" and "budget" in result["reason"]


# --- bookkeeping: what is timed, compared and written -----------------------------------------------------


def test_bench_threads_never_exceed_the_cpus_onnxruntime_sizes_its_pool_from(monkeypatch):
    # ONNX Runtime's intra-op pool is torch's count capped at the CPUs the process may use; torch takes any count.
    # More threads than CPUs would time eager oversubscribed against ONNX Runtime at the CPU count.
    monkeypatch.setattr(timing, "available_cpus", lambda: 2)
    monkeypatch.setenv("DIFFRT_BENCH_THREADS", "4")
    assert bench_threads() == 2 and bench_threads(8) == 2 and bench_threads(1) == 1
    monkeypatch.delenv("DIFFRT_BENCH_THREADS")
    assert bench_threads() == 2
    monkeypatch.setenv("DIFFRT_BENCH_THREADS", "two")  # was a ValueError traceback
    with pytest.raises(DiffrtError, match="DIFFRT_BENCH_THREADS='two' must be a whole number of threads"):
        bench_threads()
    monkeypatch.delenv("DIFFRT_BENCH_THREADS")
    monkeypatch.undo()
    for asked in (1, 64):
        with cpu_threads(bench_threads(asked)):
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))  # what OnnxRuntimeBackend gives its pool (both)


def test_run_bench_pays_one_time_imports_before_the_first_cell(tmp_path, tiny_configs, monkeypatch):
    # The first cell measured in a process was charged ~300 MB of imports; the loop over
    # NullBackends, measured first, pays them before any cell's memory baseline.
    calls = []

    def fake_loop(config, device, options):
        calls.append(("loop", config.name))
        return {"config": config.name, "status": "error", "reason": "not measured in this test"}

    def fake_cell(config, backend, device, share=None):
        calls.append(("cell", config.name))
        return skipped(config, backend, "error", "not measured in this test")

    monkeypatch.setattr(diffrt.bench, "measure_loop", fake_loop)
    monkeypatch.setattr(diffrt.bench, "open_cell", fake_cell)
    run_bench(out_dir=tmp_path, repeats=1, configs=["test-digits", "test-digits-unguided"], threads=1, kernels=False)
    for name in ("test-digits", "test-digits-unguided"):
        mine = [kind for kind, config in calls if config == name]
        assert mine[0] == "loop" and "cell" in mine[1:], calls


def test_isolated_child_primes_before_it_measures(tiny_configs, monkeypatch):
    guided, _ = tiny_configs
    calls, sent = [], []
    monkeypatch.setattr(cells, "prime", lambda config, device: calls.append("prime"))
    monkeypatch.setattr(cells, "measure_cell", lambda *a: (calls.append("cell"), ({"status": "ok"}, None))[1])

    class Conn:
        def send(self, obj):
            sent.append(obj)

        def close(self):
            pass

    cells._child(Conn(), guided, "torch-compile", "cpu", CellOptions(repeats=1), 1)
    assert calls == ["prime", "cell"] and sent == [({"status": "ok"}, None)]


def _ok_row(config: str, backend: str, median_ms: float) -> dict:
    e2e = {"median_ms": median_ms, "p90_ms": median_ms, "min_ms": median_ms, "n": 1}
    return {"config": config, "backend": backend, "status": "ok", "device": "cpu", "setup_s": 0.1, "runs": 1,
            "end_to_end_per_image": e2e, "images_per_s": 1000.0 / median_ms, "ms_per_step": median_ms,
            "components": {}, "memory": {"peak_mb": 1.0, "method": "test"}}


def _report(rows: list[dict]) -> dict:
    machine = {"cpu": "test cpu", "cpus_available": 1, "threads": 1, "gpu": None, "load_average_1min": 0.0}
    settings = {"repeats": 1, "warmup_steps": 2, "cell_budget_s": 1.0, "min_runs": 1}
    return {"machine_tag": "test", "machine": machine, "versions": {}, "settings": settings, "command": "test",
            "wall_s": 1.0, "results": rows, "loop_overhead": [], "targets": []}


def test_outputs_are_compared_with_eager_of_the_same_config_at_the_configured_tolerance():
    exact = BenchConfig("exact", "tolerance 0: bit for bit", num_images=1, num_inference_steps=1, guidance_scale=1.0,
                        match_tolerance=0.0)
    loose = dataclasses.replace(exact, name="loose", match_tolerance=None)  # fp32: 1e-2
    rows = [_ok_row(c, b, ms) for c in ("exact", "loose") for b, ms in (("torch", 40.0), ("onnxruntime", 10.0))]
    rows.append(_ok_row("loose", "optimum-onnxruntime", 20.0))
    zeros = torch.zeros(1, 3, 8, 8)
    images = {("exact", "torch"): zeros, ("exact", "onnxruntime"): zeros + 1e-3,
              ("loose", "torch"): zeros + 0.5, ("loose", "onnxruntime"): zeros + 0.505,
              ("loose", "optimum-onnxruntime"): torch.zeros(1, 3, 4, 4)}
    _compare_with_eager(rows, images, {"exact": exact, "loose": loose})
    r = {(x["config"], x["backend"]): x for x in rows}
    assert r[("exact", "onnxruntime")]["speedup_vs_eager"] == 4.0  # eager's time over the backend's
    assert r[("exact", "onnxruntime")]["match_tolerance"] == 0.0 and not r[("exact", "onnxruntime")]["matches_eager"]
    assert r[("loose", "onnxruntime")]["max_abs_diff_vs_eager"] == pytest.approx(5e-3)  # against its own config's eager
    assert r[("loose", "onnxruntime")]["matches_eager"] and r[("loose", "torch")]["max_abs_diff_vs_eager"] == 0.0
    # Images of another shape are no match, and the table marks them so.
    odd = r[("loose", "optimum-onnxruntime")]
    assert odd["matches_eager"] is False and "(1, 3, 4, 4)" in odd["match_note"] and "max_abs_diff_vs_eager" not in odd
    table = {line.split(" | ")[1]: line for line in markdown(_report(rows)).splitlines() if line.startswith("| loose |")}
    assert table["optimum-onnxruntime"].endswith("– ✗ |") and "✗" not in table["onnxruntime"]


def test_chart_is_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    path = chart(_report([_ok_row("c", "torch", 5.0)]), tmp_path / "bench_test.png")
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        chart(_report([_ok_row("c", "torch", 6.0)]), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_kernel_benchmark_alternates_rounds_of_calls_and_summarises_as_the_suite_does(monkeypatch):
    """Each call was timed alone between two synchronisations, reference first and Triton after: the fixed cost of
    a synchronisation went to both sides, and drift to one. Now rounds of back-to-back calls alternate."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clock, order = {"now": 0.0}, []

    def timed(name: str, seconds: float):
        def call():
            order.append(name)
            clock["now"] += seconds
        return call

    monkeypatch.setattr(module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock["now"])}))
    times, ratios = module.time_rounds({"reference": timed("reference", 0.004), "triton": timed("triton", 0.001)},
                                       torch.device("cpu"), warmup=0, rounds=4, calls=3)
    rounds = [order[i:i + 3][0] for i in range(0, len(order), 3)]
    assert rounds == ["reference", "triton", "triton", "reference", "reference", "triton", "triton", "reference"]
    assert ratios == pytest.approx([4.0] * 4) and times["reference"] == pytest.approx(summarize_ms([0.004] * 4))
    assert times["triton"]["median_ms"] == pytest.approx(1.0) and times["triton"]["n"] == 4
    result = module.run("cpu", warmup=1, iters=4, calls=2)  # no CUDA: the reference alone, summarised per call
    assert all(case["triton"] is None and case["speedup"] is None and case["reference"]["n"] == 2 for case in result["cases"].values())


def test_a_text_to_image_configuration_samples_with_its_scheduler():
    """sd15-lcm's request is LCM's: the workload's pipeline call samples with LCM, not the folder's DDIM."""
    import dataclasses

    lcm = CONFIGS["sd15-lcm"]
    assert (lcm.scheduler, lcm.num_inference_steps, lcm.guidance_scale) == ("lcm", 4, 1.0)
    tiny = dataclasses.replace(CONFIGS["tiny-t2i-controlnet"], scheduler=lcm.scheduler, num_inference_steps=2, guidance_scale=1.0)
    cpu = torch.device("cpu")
    tiny.prepare(cpu)
    pipe = tiny.open("torch", cpu).pipeline
    assert pipe(tiny.prompt, num_inference_steps=2, **tiny._kwargs([])).metadata["scheduler"] == "lcm"


def test_the_cpu_target_is_not_judged_met_on_a_partial_run():
    """The bug: a run of tiny-t2i-controlnet alone (5x) reported the CPU target "met", which the digits model (1.2x)
    fails: the goal is every small configuration."""
    from diffrt.bench.report import cpu_exported_target

    def row(config, speedup, p25=None):
        return {"status": "ok", "device": "cpu", "backend": "onnxruntime", "config": config, "speedup_vs_eager": speedup,
                "matches_eager": True, **({"speedup_spread": {"p25": p25, "p75": speedup + 0.2}} if p25 is not None else {})}

    partial = cpu_exported_target([row("tiny-t2i-controlnet", 5.3)])
    assert partial["status"] == "not measured" and "partial run" in partial["detail"] and "digits did not run" in partial["detail"]
    assert cpu_exported_target([row("tiny-t2i-controlnet", 5.3), row("digits", 2.1)])["status"] == "met"
    assert cpu_exported_target([row("tiny-t2i-controlnet", 5.3), row("digits", 1.2)])["status"] == "not met"
    assert cpu_exported_target([row("digits", 1.2)])["status"] == "not met"  # failing what ran needs no more
    # A median over the goal whose low quartile is under it is not a result either way (as the guidance target judges).
    straddling = cpu_exported_target([row("tiny-t2i-controlnet", 5.3, 4.9), row("digits", 2.05, 1.8)])
    assert straddling["status"] == "not resolved" and "digits: onnxruntime 2.05x (low quartile 1.80x)" in straddling["detail"]
    assert cpu_exported_target([row("tiny-t2i-controlnet", 5.3, 4.9), row("digits", 2.3, 2.1)])["status"] == "met"


# --- interleaved rounds, paired ratios, and what the files record (review of the benchmark) ---------------


class _FakeWork:
    def __init__(self, name: str, log: list, seconds: float):
        self.name, self.log, self.seconds = name, log, seconds
        self.pipeline, self.component_attrs, self.details = None, (), {}

    def run(self, steps: int) -> torch.Tensor:
        self.log.append(self.name)
        return torch.zeros(1, 3, 2, 2)


def _fake_cell(config: BenchConfig, name: str, log: list) -> cells.Cell:
    return cells.Cell(config, name, _FakeWork(name, log, 0.0), {}, 0.0, 0.0, {"peak_mb": 0.0, "method": "test"})


def test_cells_are_timed_in_alternating_rounds_not_one_block_after_the_other():
    """The bug: each backend's runs were timed in one block, so a load change landed on one side only."""
    config = BenchConfig("c", "test", num_images=1, num_inference_steps=1, guidance_scale=1.0)
    log: list[str] = []
    pair = [_fake_cell(config, "torch", log), _fake_cell(config, "onnxruntime", log)]
    cells.time_rounds(pair, torch.device("cpu"), CellOptions(repeats=4, min_time_s=0))
    assert log == ["torch", "onnxruntime", "onnxruntime", "torch"] * 2  # ABBA: a steady drift costs both alike
    assert all(len(c.runs) == 4 for c in pair)


def test_short_configurations_run_until_a_minimum_measured_time(monkeypatch):
    config = BenchConfig("c", "test", num_images=1, num_inference_steps=1, guidance_scale=1.0)
    log: list[str] = []
    clock = {"now": 0.0}
    monkeypatch.setattr(cells.time, "perf_counter", lambda: clock.__setitem__("now", clock["now"] + 0.05) or clock["now"])
    one = [_fake_cell(config, "torch", log)]
    cells.time_rounds(one, torch.device("cpu"), CellOptions(repeats=3, min_time_s=0.5, max_runs=30))
    assert len(one[0].runs) == 10  # 0.05 s runs: ten to reach 0.5 s, not three
    one = [_fake_cell(config, "torch", log)]
    cells.time_rounds(one, torch.device("cpu"), CellOptions(repeats=3, min_time_s=100.0, max_runs=7))
    assert len(one[0].runs) == 7  # capped


@pytest.mark.parametrize("asked", [False, True])
def test_repeats_asked_for_are_all_run_where_the_default_is_cut_for_slow_cells(monkeypatch, asked):
    """From a review: --repeats 20 on a cell of 10 s runs (past the 20 s cell budget) ran 3 rounds and recorded 20.
    The default (5) is still cut to 3 for such cells, so a default run fits its time; a number asked for is run."""
    config = BenchConfig("c", "test", num_images=1, num_inference_steps=1, guidance_scale=1.0)
    clock = {"now": 0.0}
    monkeypatch.setattr(cells.time, "perf_counter", lambda: clock.__setitem__("now", clock["now"] + 10.0) or clock["now"])
    one = [_fake_cell(config, "torch", [])]
    cells.time_rounds(one, torch.device("cpu"), CellOptions(repeats=20 if asked else 5, budget_s=20.0, repeats_asked=asked))
    assert len(one[0].runs) == (20 if asked else 3)
    one = [_fake_cell(config, "torch", [])]
    cells.time_rounds(one, torch.device("cpu"), CellOptions(repeats=40, budget_s=20.0, repeats_asked=True))
    assert len(one[0].runs) == 40  # past max_runs too: asked for


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_a_bench_budget_that_is_no_positive_time_is_refused(monkeypatch, tmp_path, value):
    """From a review: DIFFRT_BENCH_BUDGET_S=0 read as unset (270 s), and a negative one was taken."""
    from diffrt.errors import DiffrtError

    monkeypatch.setenv("DIFFRT_BENCH_BUDGET_S", value)
    with pytest.raises(DiffrtError, match="DIFFRT_BENCH_BUDGET_S=.* must be a number of seconds > 0"):
        run_bench(out_dir=tmp_path, configs=["digits"], threads=1, kernels=False)


def test_speedup_is_the_median_of_per_round_ratios_with_its_spread():
    rows = [_ok_row("c", "torch", 40.0), _ok_row("c", "onnxruntime", 10.0), _ok_row("c", "torch-compile", 20.0)]
    rows[0].update(run_s=[0.4, 0.8, 0.4], round_group="c")  # eager slowed in round 2 ...
    rows[1].update(run_s=[0.1, 0.4, 0.1], round_group="c")  # ... and so did the backend in the same round
    _compare_with_eager(rows, {}, {"c": BenchConfig("c", "t", num_images=1, num_inference_steps=1, guidance_scale=1.0)})
    ort, compiled = rows[1], rows[2]
    assert ort["speedup_vs_eager"] == pytest.approx(4.0) and ort["speedup_method"].startswith("median of per-round")
    assert ort["speedup_spread"]["min"] == pytest.approx(2.0) and ort["speedup_spread"]["max"] == pytest.approx(4.0)
    # Timed apart (no shared rounds): a ratio of medians, and the table says so.
    assert compiled["speedup_vs_eager"] == pytest.approx(2.0) and compiled["speedup_spread"] is None
    table = {line.split(" | ")[1]: line for line in markdown(_report(rows)).splitlines() if line.startswith("| c |")}
    assert "4.00x [2.00–4.00]" in table["onnxruntime"] and "2.00x apart" in table["torch-compile"]


def test_guidance_overhead_is_judged_on_alternating_pairs_and_not_resolved_when_noise_straddles_the_limit():
    """The bug: two blocks timed a minute apart gave +16.9 % and -24 %, and each was judged "met"."""
    from diffrt.bench.report import guidance_target

    def pair(guided_s, plain_s, group="g+u"):
        g, u = _ok_row("g", "onnxruntime", 100.0), _ok_row("u", "onnxruntime", 100.0)
        g.update(run_s=guided_s, round_group=group)
        u.update(run_s=plain_s, round_group=group)
        return [g, u]

    met = guidance_target(pair([1.05, 1.10, 1.08], [1.0, 1.0, 1.0]), {"g": "u"})
    assert met["status"] == "met" and met["values"]["end_to_end"]["g/onnxruntime"] == pytest.approx(0.08)
    straddles = guidance_target(pair([1.05, 1.30, 1.15], [1.0, 1.0, 1.0]), {"g": "u"})
    assert straddles["status"] == "not resolved" and "not resolved" in straddles["detail"]
    assert guidance_target(pair([1.25, 1.30, 1.40], [1.0, 1.0, 1.0]), {"g": "u"})["status"] == "not met"
    # Four rounds are judged on their whole range too: one outlying round is no "met" (a review's; nearest rank took the
    # third of four for the upper quartile).
    four = guidance_target(pair([1.0, 1.03, 1.01, 1.429], [1.0, 1.0, 1.0, 1.0]), {"g": "u"})
    assert four["status"] == "not resolved" and four["values"]["spread"]["g/onnxruntime"]["p75"] == pytest.approx(0.429)
    apart = guidance_target(pair([1.0], [1.0], group=None), {"g": "u"})
    assert apart["status"] == "not resolved" and "timed apart" in apart["detail"]


def test_contention_warns_at_one_thread_when_the_load_exceeds_the_cpus():
    """The bug: one thread never warned, whatever the load."""
    info = {"gpu": None, "cpus_available": 2, "threads": 1, "load_average_1min": 1.5}
    assert timing.contention(info) is None
    assert "more runnable processes than CPUs" in timing.contention({**info, "load_average_1min": 3.2})
    assert "more runnable" in timing.contention(info, load=2.5)  # the load at the end, judged alike
    assert "compete" in timing.contention({**info, "threads": 2})
    # At the end the load holds the run's own threads: two busy ones on two idle CPUs are no competition (a review's:
    # a run as wide as the machine always warned), two more are.
    assert timing.contention({**info, "threads": 2}, load=2.0, at_end=True) is None
    assert "3.6 at the end, 1.6 of it beyond the run's own 2 threads, on 2 CPUs" in timing.contention({**info, "threads": 2}, load=3.6, at_end=True)
    assert timing.contention(info, load=2.8, at_end=True) is None  # one thread: its own is in the load too


def test_provenance_names_the_commit_and_whether_the_tree_was_dirty(monkeypatch):
    from diffrt.bench import provenance

    meta = provenance.run_metadata(threads=1)
    assert meta["threads"] == 1 and meta["cpu"] and meta["diffrt"] and meta["load_average_1min_at_end"] is None
    if (provenance.SOURCE_ROOT / ".git").exists():
        assert len(meta["commit"]) == 40 and isinstance(meta["dirty"], bool)
    assert provenance.finish(meta)["load_average_1min_at_end"] is not None
    monkeypatch.setattr(provenance, "SOURCE_ROOT", Path("/nonexistent-checkout"))
    assert provenance.git_state() == {"commit": None, "dirty": None}


def test_provenance_dirty_means_the_code_changed_not_the_committed_results(tmp_path, monkeypatch):
    """Rerunning `diffrt bench --out benchmarks/results` over the committed files must not mark the next
    run's provenance dirty (its commit names the code that ran); an edited source file must."""
    import shutil
    import subprocess

    from diffrt.bench import provenance

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "src").mkdir()
    (tmp_path / provenance.RESULTS).mkdir(parents=True)
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / provenance.RESULTS / "bench.json").write_text("{}\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    monkeypatch.setattr(provenance, "SOURCE_ROOT", tmp_path)

    assert provenance.git_state()["dirty"] is False
    (tmp_path / provenance.RESULTS / "bench.json").write_text('{"rerun": true}\n')
    assert provenance.git_state()["dirty"] is False
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert provenance.git_state()["dirty"] is True


def test_the_chart_marks_a_backend_whose_output_differs_from_eager():
    from diffrt.bench.report import _bar_colour, bar_label

    good, bad = _ok_row("c", "onnxruntime", 10.0), _ok_row("c", "optimum-onnxruntime", 5.0)
    good.update(speedup_vs_eager=2.0, matches_eager=True)
    bad.update(speedup_vs_eager=4.0, matches_eager=False)
    assert "✗" not in bar_label(good) and "✗" in bar_label(bad) and "differs" in bar_label(bad)
    # A ratio timed in another process says so beside its bar, as in the table; a paired one shows its spread.
    assert bar_label({**good, "speedup_vs_eager": 1.06, "speedup_method": "ratio of medians, timed apart"}).endswith("1.06x apart")
    assert bar_label({**good, "speedup_vs_eager": 2.85, "speedup_spread": {"p25": 2.61, "p75": 3.01}}).endswith("2.85x [2.61–3.01]")
    assert _bar_colour(bad) != _bar_colour(good)


def test_budget_from_the_environment_and_files_written_after_each_configuration(tmp_path, tiny_configs, monkeypatch):
    """The bug: results were written only at the end, so `timeout 200` around a 3000 s budget left nothing."""
    from diffrt.bench import report as rp

    written = []
    real_write = rp.write
    monkeypatch.setattr(rp, "write", lambda report, out: (written.append(report), real_write(report, out))[1])
    monkeypatch.setattr(diffrt.bench, "measure_loop", lambda c, d, o: {"config": c.name, "status": "error", "reason": "test"})
    monkeypatch.setattr(diffrt.bench, "open_cell", lambda c, b, d, share=None: skipped(c, b, "error", "test"))
    run_bench(out_dir=tmp_path, repeats=1, configs=["test-digits"], threads=1, kernels=True)
    assert len(written) >= 2 and "kernel" in written[0]["partial"] and written[-1]["partial"] is None
    monkeypatch.setattr(diffrt.bench, "_kernels", lambda device: {"status": "not run", "reason": "test"})
    monkeypatch.setenv("DIFFRT_BENCH_BUDGET_S", "1e-9")
    paths = run_bench(out_dir=tmp_path, repeats=1, configs=["test-digits"], threads=1, kernels=False)
    report = json.loads(paths[0].read_text())
    assert report["settings"]["budget_s"] == 1e-9 and "DIFFRT_BENCH_BUDGET_S=1e-9" in report["command"]
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in report["results"])


def test_sd15_controlnet_output_convolutions_are_not_zero():
    """The bug: diffusers zero-initialises them, so an engine that dropped the ControlNet matched eager."""
    from diffusers import ControlNetModel

    from diffrt.bench.sd15 import _noise_zero_convs

    controlnet = ControlNetModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                 conditioning_embedding_out_channels=(4, 8))
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    assert all(not c.weight.any() for c in convs)  # what diffusers gives
    _noise_zero_convs(controlnet, torch.Generator().manual_seed(1))
    assert all(c.weight.abs().sum() > 0 and c.bias.abs().sum() > 0 for c in convs)


def test_optimum_samples_with_the_configurations_scheduler_and_the_benchmarks_threads():
    """The bug: DDIM whatever the configuration said, and ONNX Runtime's pool at its default size."""
    from diffusers import DDIMScheduler

    from diffrt.bench.optimum_ort import diffusers_scheduler, session_options

    ddim = DDIMScheduler(num_train_timesteps=1000).config
    assert type(diffusers_scheduler("lcm", ddim)).__name__ == "LCMScheduler"
    assert type(diffusers_scheduler("dpm", ddim)).__name__ == "DPMSolverMultistepScheduler"
    assert type(diffusers_scheduler(None, ddim)).__name__ == "DDIMScheduler"
    if importlib.util.find_spec("onnxruntime"):
        with cpu_threads(1):
            assert session_options().intra_op_num_threads == 1


def test_a_cells_memory_is_its_request_not_its_first_warm_up(monkeypatch):
    """From a review: the peak was taken over the first warm-up, where torch.compile traces and compiles (its
    column read 432 MB against eager's 26 MB for one 20 MB model). A workload whose first run holds 400 MB for a
    moment and whose later runs hold 40 MB reports about 40."""
    from diffrt.bench.configs import Workload

    config = BenchConfig("c", "test", num_images=1, num_inference_steps=1, guidance_scale=1.0)
    calls = []

    def run(steps: int) -> torch.Tensor:
        calls.append(steps)
        held = torch.ones((400 if len(calls) == 1 else 40) << 18)  # float32: 4 bytes each, so MB
        time.sleep(0.1)  # the monitor samples every 10 ms
        return held[:12].view(1, 3, 2, 2)

    monkeypatch.setattr(config, "open", lambda backend, device: Workload(None, run))
    cell = cells.open_cell(config, "torch", torch.device("cpu"))
    assert len(calls) == 2 and 30 <= cell.memory["peak_mb"] <= 200, cell.memory


def test_a_cell_whose_open_exports_says_so_beside_its_setup_and_peak(tiny_configs, tmp_path, monkeypatch):
    """Setup time and peak memory counted the export when the cache was cold (67 MB and 5.7 s against 21 MB and
    0.9 s warm) and the result did not say which it was."""
    pytest.importorskip("onnxruntime")
    from diffrt.bench.cells import CellOptions, open_cell, summarize_cell, time_rounds

    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cold"))
    guided, _ = tiny_configs
    rows = []
    for _ in range(2):  # a cold cache, then the export it left
        cell = open_cell(guided, "onnxruntime", torch.device("cpu"))
        assert not isinstance(cell, dict), cell
        time_rounds([cell], torch.device("cpu"), CellOptions(repeats=1, min_runs=1, min_time_s=0))
        rows.append(summarize_cell(cell, torch.device("cpu"))[0])
    assert rows[0].get("export_made") is True and "export_made" not in rows[1]


def test_an_optimum_export_killed_midway_is_not_taken_for_one(tmp_path):
    """From a review: optimum's export went straight into its cache folder, and the next run trusted whatever a killed
    one had left there once model_index.json existed. It is staged beside the folder and renamed in once whole."""
    from diffrt.bench.optimum_ort import export_once

    out = tmp_path / "optimum-tiny-fp32"

    def killed(staging):
        staging.mkdir()
        (staging / "model_index.json").write_text("{}")  # written before the components
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_once(out, killed)
    assert not out.exists()
    made = []

    def whole(staging):
        made.append(staging)
        (staging / "unet").mkdir(parents=True)
        (staging / "model_index.json").write_text("{}")

    export_once(out, whole)
    export_once(out, whole)  # a finished export is reused
    assert len(made) == 1 and (out / "unet").is_dir() and [p.name for p in tmp_path.iterdir()] == [out.name]
