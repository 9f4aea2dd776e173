"""Backend plumbing that runs without a GPU: which device a backend gets, the bookkeeping of the
TensorRT backend's CUDA graphs (one execution context per captured shape) over fake TensorRT objects,
and ONNX Runtime's IO binding of every dtype (on the CPU) and choice of providers.
The real engines are exercised by the `gpu` tests in test_tensorrt.py."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffrt.errors import BackendUnavailableError
from diffrt.runtime import backends
from diffrt.runtime.backends import default_device, resolve_device


@pytest.fixture
def cuda(monkeypatch):
    """Pretend torch sees (True) or does not see (False) a GPU."""
    def set_cuda(available: bool, onnxruntime_cuda: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(backends, "_onnxruntime_has_cuda", lambda: onnxruntime_cuda)
    return set_cuda


def test_no_device_means_cuda_when_available(cuda):
    cuda(True)
    assert resolve_device(None, "torch") == torch.device("cuda")
    assert resolve_device(None, "tensorrt") == torch.device("cuda")
    assert resolve_device(None, "onnxruntime") == torch.device("cuda")
    assert resolve_device("cpu", "torch") == torch.device("cpu")  # an explicit device wins
    cuda(True, onnxruntime_cuda=False)  # a CPU-only ONNX Runtime build on a GPU machine stays on the CPU
    assert default_device("onnxruntime") == torch.device("cpu") and default_device("torch") == torch.device("cuda")
    cuda(False)
    assert resolve_device(None, "torch") == resolve_device(None, "onnxruntime") == torch.device("cpu")


def test_tensorrt_needs_cuda_and_says_so_in_one_line(cuda):
    cuda(True)
    with pytest.raises(BackendUnavailableError, match=r"runs on a CUDA device, not cpu; pass --device cuda") as info:
        resolve_device("cpu", "tensorrt")
    assert "\n" not in str(info.value)
    cuda(False)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU and torch sees none"):
        resolve_device(None, "tensorrt")


def test_tensorrt_on_the_cpu_fails_before_any_export(uncond_model_dir, cuda, monkeypatch):
    # The bug: --device defaulted to cpu, so `generate --backend tensorrt` built an engine and only then failed.
    from diffrt.export import artifact
    from diffrt.runtime import loading

    cuda(True)
    monkeypatch.setattr(loading, "require_backend", lambda name: None)  # as if TensorRT were installed

    def no_export(*args, **kwargs):
        raise AssertionError("an engine was built for a device TensorRT cannot run on")

    monkeypatch.setattr(artifact, "export_pixel_model", no_export)
    with pytest.raises(BackendUnavailableError, match="runs on a CUDA device"):
        loading.open_pixel_pipeline(uncond_model_dir, "tensorrt", "cpu")


def test_serve_resolves_the_device_before_loading(cuda):
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    cuda(False)
    assert make_worker(RuntimeConfig(backend="onnxruntime")).device == "cpu"
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        make_worker(RuntimeConfig(backend="tensorrt"))


# --- TensorRT CUDA graphs: one context per shape key, sharing one block of activation memory ---------------


class FakeContext:
    def __init__(self, with_setter: bool):
        self.memory = None
        if with_setter:
            self.set_device_memory = lambda ptr, size: setattr(self, "memory", (ptr, size))


def fake_backend(with_setter: bool = True):
    from diffrt.runtime.backends.tensorrt import TensorRTBackend

    made = []

    def create_execution_context(strategy):
        made.append(strategy)
        return FakeContext(with_setter)

    backend = object.__new__(TensorRTBackend)  # no engine file: only the graph bookkeeping is under test
    backend.device = torch.device("cpu")
    backend.spec = SimpleNamespace(name="unet")
    backend._trt = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user-managed"))
    backend.engine = SimpleNamespace(device_memory_size_v2=4096, create_execution_context=create_execution_context)
    backend._graphs, backend._graph_memory, backend._refits, backend._graphs_refit = {}, None, [0], 0
    return backend, made


@pytest.mark.parametrize("with_setter", [True, False], ids=["set_device_memory", "device_memory"])
def test_graph_contexts_are_user_managed_on_one_shared_block(with_setter):
    backend, made = fake_backend(with_setter)
    a, b = backend._graph_context(), backend._graph_context()
    assert a is not b and made == ["user-managed", "user-managed"]
    ptr = backend._graph_memory.data_ptr()
    assert backend._graph_memory.numel() == 4096
    assert (a.memory, b.memory) == (((ptr, 4096),) * 2 if with_setter else (None, None))
    if not with_setter:
        assert a.device_memory == b.device_memory == ptr


def test_each_shape_replays_its_own_graph_and_later_shapes_run_plainly(monkeypatch):
    from diffrt.runtime.backends import tensorrt as trt_backend

    backend, _ = fake_backend()
    captured, replayed, executed = [], [], []

    def capture(inputs):
        shape = tuple(inputs["sample"].shape)
        captured.append(shape)
        graph = SimpleNamespace(replay=lambda: replayed.append(shape))
        static_in = {n: t.clone() for n, t in inputs.items()}
        return trt_backend._Graph(context=f"context for {shape}", inputs=static_in,
                                  outputs={"noise_pred": torch.full(shape, float(shape[0]))}, graph=graph)

    monkeypatch.setattr(backend, "_capture", capture)
    monkeypatch.setattr(backend, "_execute", lambda inputs: executed.append(tuple(inputs["sample"].shape)) or {})
    monkeypatch.setattr(trt_backend, "MAX_GRAPHS", 2)
    feeds = [{"sample": torch.full((b, 3, 8, 8), float(i))} for i, b in enumerate((1, 2, 1, 4, 2))]
    assert not backend.replays_graphs  # asked for, none captured yet
    outs = [backend._run_graph(feed) for feed in feeds]
    assert backend.replays_graphs
    assert captured == [(1, 3, 8, 8), (2, 3, 8, 8)]  # each key once; the third key is over MAX_GRAPHS
    assert replayed == [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8), (2, 3, 8, 8)] and executed == [(4, 3, 8, 8)]
    graph_1 = backend._graphs[(("sample", (1, 3, 8, 8)),)]
    assert graph_1.context == "context for (1, 3, 8, 8)"
    assert torch.equal(graph_1.inputs["sample"], feeds[2]["sample"])  # the latest input was copied in before the replay
    assert outs[0]["noise_pred"] is not graph_1.outputs["noise_pred"]  # a copy: the next replay overwrites the buffer


@pytest.mark.parametrize("spec, sizes, words", [
    ("unet", dict(batch=5), r"batch 5 is outside the built range \[1, 4\]"),
    ("unet", dict(height=20, width=20), r"height 20 is outside the built range \[8, 16\]"),
    ("unet", dict(height=4, width=4), r"height 4 is outside"),
    ("text_encoder", dict(sequence=78), r"sequence 78 is outside the built range \[1, 77\]"),
])
def test_a_feed_outside_the_profile_is_refused_before_tensorrt_sees_it(spec, sizes, words):
    # RELIABILITY #3: the backend checks every feed against the built ranges (batch, size, token
    # length) itself, so TensorRT's "no valid profile found" never surfaces. The backend here has no
    # engine, context or stream: a feed that got past the check would fail on those, not on its shape.
    from diffrt.components import pixel_unet_spec, text_encoder_spec
    from diffrt.errors import ShapeOutOfRangeError
    from diffrt.runtime.backends.tensorrt import TensorRTBackend

    backend = object.__new__(TensorRTBackend)
    backend.spec = {"unet": pixel_unet_spec(3, 8, conditioned=False, batch=(1, 2, 4), size=(8, 8, 16)),
                    "text_encoder": text_encoder_spec(vocab_size=100, hidden_size=8, batch=(1, 2, 4))}[spec]
    with pytest.raises(ShapeOutOfRangeError, match=words):
        backend.run(backend.spec.example_feed("opt", **sizes))


def test_a_refit_through_a_clone_drops_the_graphs_captured_before_it(monkeypatch):
    # Clones share the engine (and its refit count): graphs captured on the old weights are
    # captured again on the next run, whichever backend of the engine made the refit.
    backend, _ = fake_backend()
    captured = []

    def capture(inputs):
        captured.append(tuple(inputs["sample"].shape))
        return None

    monkeypatch.setattr(backend, "_capture", capture)
    monkeypatch.setattr(backend, "_execute", lambda inputs: {})
    feed = {"sample": torch.zeros(1, 3, 8, 8)}
    backend._run_graph(feed)
    backend._run_graph(feed)
    assert len(captured) == 1
    twin = copy.copy(backend)
    twin._graphs = {}
    twin._refits[0] += 1  # what twin.refit counts
    backend._run_graph(feed)
    assert len(captured) == 2


def test_a_failed_capture_is_not_reported_as_cuda_graphs(monkeypatch):
    # Results report graphs that really replay (RELIABILITY #15), not the cuda_graph request.
    backend, _ = fake_backend()
    monkeypatch.setattr(backend, "_capture", lambda inputs: None)
    monkeypatch.setattr(backend, "_execute", lambda inputs: {})
    backend._run_graph({"sample": torch.zeros(1, 3, 8, 8)})
    assert backend._graphs and not backend.replays_graphs


# --- onnxruntime: element types and provider choice -----------------------------------------------------


def _identity_model(path, types: dict[str, int]):
    """A real ONNX file: one Identity per input, `<name>_out`, each with a dynamic `batch` axis."""
    from onnx import helper, save

    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in types]
    inputs = [helper.make_tensor_value_info(n, t, ["batch", 3]) for n, t in types.items()]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, ["batch", 3]) for n, t in types.items()]
    model = helper.make_model(helper.make_graph(nodes, "identity", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    save(model, str(path))


def test_onnxruntime_binds_every_dtype_it_declares(tmp_path):
    # The bug: element types went to bind_input as numpy names, and numpy has no bfloat16 ("Numpy_type
    # 256 can't be converted to MLDataType"); ONNX Runtime >= 1.20 takes ONNX type numbers for all.
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    from diffrt.components import ComponentSpec, TensorSpec
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    dtypes = {"bf16": (TensorProto.BFLOAT16, torch.bfloat16), "fp16": (TensorProto.FLOAT16, torch.float16),
              "fp32": (TensorProto.FLOAT, torch.float32), "fp64": (TensorProto.DOUBLE, torch.float64),
              "i32": (TensorProto.INT32, torch.int32), "i64": (TensorProto.INT64, torch.int64)}
    _identity_model(tmp_path / "model.onnx", {n: onnx_type for n, (onnx_type, _) in dtypes.items()})
    spec = ComponentSpec("identity", tuple(TensorSpec(n, ("batch", 3)) for n in dtypes),
                         tuple(TensorSpec(f"{n}_out", ("batch", 3)) for n in dtypes), ranges={"batch": (1, 2, 4)})
    backend = OnnxRuntimeBackend(tmp_path / "model.onnx", spec, threads=1)
    feed = {n: (torch.arange(6) * 1000 + 7).reshape(2, 3).to(dtype) for n, (_, dtype) in dtypes.items()}
    feed["fp32"] = torch.randn(3, 2).t()  # not contiguous: bound as a contiguous copy
    out = backend.run(feed)
    for name, (_, dtype) in dtypes.items():
        assert out[f"{name}_out"].dtype == dtype and torch.equal(out[f"{name}_out"], feed[name]), name


def test_onnxruntime_cpu_providers_and_a_one_line_refusal_of_cuda():
    ort = pytest.importorskip("onnxruntime")
    from diffrt.runtime.backends.onnxruntime import default_providers

    assert default_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match=r"no CUDA provider here .*pip install onnxruntime-gpu") as info:
        default_providers(torch.device("cuda"))
    assert "\n" not in str(info.value)


def test_onnxruntime_on_cuda_asks_for_tensorrt_only_where_it_is_installed(monkeypatch, tmp_path):
    # Only the choice of providers and their options is checked here (the GPU itself is not):
    # onnxruntime-gpu lists TensorRT's provider whether or not TensorRT is installed.
    import sys
    import types

    ort = pytest.importorskip("onnxruntime")
    from diffrt.components import pixel_unet_spec
    from diffrt.export import manifest
    from diffrt.runtime.backends import onnxruntime as ort_backend

    spec = pixel_unet_spec(3, 16, conditioned=True, num_labels=11, batch=(1, 2, 8), size=(8, 16, 32))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    monkeypatch.setattr(ort_backend, "tensorrt_installed", lambda: False)
    assert ort_backend.default_providers(torch.device("cuda", 1), spec) == cuda

    monkeypatch.setattr(ort_backend, "tensorrt_installed", lambda: True)  # TensorRT 10.3 on an H100
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(manifest, "gpu_identity", lambda device=None: {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path))
    (name, options), *rest = ort_backend.default_providers(torch.device("cuda", 1), spec)
    assert name == "TensorrtExecutionProvider" and rest == cuda
    assert options["device_id"] == 1 and options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert Path(options["trt_engine_cache_path"]).name == f"ort-tensorrt-{ort.__version__}-trt10.3.0-nvidia-h100-80gb-hbm3-sm90-fp32"
    assert options["trt_profile_min_shapes"] == "sample:1x3x8x8,timestep:1,class_labels:1"
    assert options["trt_profile_max_shapes"] == "sample:8x3x32x32,timestep:8,class_labels:8"
    assert not any(k in options for k in ("trt_fp16_enable", "trt_bf16_enable"))
    # An fp16 graph: TensorRT 10's weakly typed networks need the provider's fp16 mode (else they may
    # run in fp32), and its engines are cached apart; TensorRT 11 takes the graph's types as they are.
    from onnx import TensorProto

    _identity_model(tmp_path / "half.onnx", {"sample": TensorProto.FLOAT16})
    (_, options), *_ = ort_backend.default_providers(torch.device("cuda", 1), spec, tmp_path / "half.onnx")
    assert options["trt_fp16_enable"] is True and options["trt_timing_cache_path"].endswith("-sm90-fp16")
    assert Path(options["trt_engine_cache_path"]).parent == Path(options["trt_timing_cache_path"])  # a folder per weights
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0"))
    (_, options), *_ = ort_backend.default_providers(torch.device("cuda", 1), spec, tmp_path / "half.onnx")
    assert "trt_fp16_enable" not in options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # onnxruntime-gpu beside a CPU-only torch
    with pytest.raises(BackendUnavailableError, match="torch sees no CUDA GPU here"):
        ort_backend.default_providers(torch.device("cuda"))


def test_onnxruntime_tensorrt_engines_are_cached_per_weights(monkeypatch, tmp_path, t2i_artifact):
    """ONNX Runtime's TensorRT provider names a cached engine by the graph's file name, its input, initializer and
    node names and the library versions, never by the weights: the same model exported with a LoRA, another scale
    or a fine-tune shared one engine folder, and ran the first export's engine. Only the options are computed here
    (the provider itself needs a GPU)."""
    import sys
    import types

    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper, save

    from diffrt.components import pixel_unet_spec
    from diffrt.export import manifest
    from diffrt.runtime.backends import onnxruntime as ort_backend

    def offset_model(path: Path, offset: float) -> Path:  # y = x + offset: one graph, names alike, weights not
        path.parent.mkdir(parents=True)
        bias = numpy_helper.from_array(np.full((3,), offset, dtype=np.float32), "bias")
        graph = helper.make_graph([helper.make_node("Add", ["sample", "bias"], ["noise_pred"])], "offset",
                                  [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 3])],
                                  [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", 3])], [bias])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        save(model, str(path))
        return path

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(manifest, "gpu_identity", lambda device=None: {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cache"))
    spec = pixel_unet_spec(3, 16, conditioned=False, batch=(1, 2, 8), size=(8, 16, 32))

    def options(path: Path) -> dict:
        return ort_backend.tensorrt_provider(torch.device("cuda", 0), spec, path)[1]

    base, lora = options(offset_model(tmp_path / "base" / "model.onnx", 0.0)), options(offset_model(tmp_path / "lora" / "model.onnx", 0.7))
    assert base["trt_engine_cache_path"] != lora["trt_engine_cache_path"]
    assert base["trt_timing_cache_path"] == lora["trt_timing_cache_path"]  # layer timings hold for any weights
    shutil.copytree(tmp_path / "base", tmp_path / "moved")
    assert options(tmp_path / "moved" / "model.onnx")["trt_engine_cache_path"] == base["trt_engine_cache_path"]
    # An artifact opened by runtime.loading names the folder from its manifest's digests: the same as hashing its files.
    comp = manifest.read_manifest(t2i_artifact)["components"]["unet_controlnet"]
    listed = {Path(rel).name: digest for rel, digest in comp["files"].items()}
    assert ort_backend.files_id(listed) == ort_backend.graph_files_id(t2i_artifact / "unet_controlnet" / "model.onnx")
    # From a review: the folder named the compute capability alone, and GPU models that share one (an A10 and an
    # RTX 3090, 8.6) ran each other's engines from a shared cache; the GPU asked about is the one the session runs on.
    asked = []

    def gpu(device=None):
        asked.append(device)
        return {"name": "NVIDIA A10" if len(asked) == 1 else "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}

    monkeypatch.setattr(manifest, "gpu_identity", gpu)
    a10, rtx = (ort_backend.tensorrt_provider(torch.device("cuda", 1), spec, tmp_path / "base" / "model.onnx")[1] for _ in "ab")
    assert Path(a10["trt_timing_cache_path"]).name.endswith("-nvidia-a10-sm86-fp32") and asked == [torch.device("cuda", 1)] * 2
    assert a10["trt_timing_cache_path"] != rtx["trt_timing_cache_path"] and a10["trt_engine_cache_path"] != rtx["trt_engine_cache_path"]


def test_onnxruntime_refuses_a_feed_outside_the_exported_ranges(tmp_path):
    """RELIABILITY #3, as the TensorRT backend does. The bug: the graph's axes are dynamic, so ONNX
    Runtime ran a batch (or size) outside the exported and verified range without a word, or failed
    on it with its own error; a missing input was a KeyError."""
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    from diffrt.components import ComponentSpec, TensorSpec
    from diffrt.errors import ShapeOutOfRangeError
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    _identity_model(tmp_path / "model.onnx", {"x": TensorProto.FLOAT})
    spec = ComponentSpec("identity", (TensorSpec("x", ("batch", 3)),), (TensorSpec("x_out", ("batch", 3)),), ranges={"batch": (1, 2, 4)})
    backend = OnnxRuntimeBackend(tmp_path / "model.onnx", spec, threads=1)
    assert backend.run({"x": torch.ones(4, 3)})["x_out"].shape == (4, 3)  # the control: the largest batch runs
    with pytest.raises(ShapeOutOfRangeError, match=r"identity: batch 5 is outside the built range \[1, 4\]"):
        backend.run({"x": torch.ones(5, 3)})
    with pytest.raises(ShapeOutOfRangeError, match=r"missing inputs \['x'\]"):
        backend.run({"y": torch.ones(2, 3)})
    # An integer input fed floats: ONNX Runtime's cast ran label 1.7 as 1, where PyTorch's embedding refuses it.
    _identity_model(tmp_path / "labels.onnx", {"labels": TensorProto.INT64})
    spec = ComponentSpec("identity", (TensorSpec("labels", ("batch", 3), "int64", high=4),),
                         (TensorSpec("labels_out", ("batch", 3), "int64"),), ranges={"batch": (1, 2, 4)})
    backend = OnnxRuntimeBackend(tmp_path / "labels.onnx", spec, threads=1)
    assert backend.run({"labels": torch.tensor([[1, 3, 2]])})["labels_out"].tolist() == [[1, 3, 2]]
    with pytest.raises(ShapeOutOfRangeError, match=r"identity.labels: expected integers \(int64\), got torch.float32"):
        backend.run({"labels": torch.tensor([[1.7, 3.0, 2.0]])})


def test_a_provider_this_onnxruntime_lacks_is_one_line_naming_those_it_has(tmp_path, caplog):
    """The bug: a provider the build does not have went to ONNX Runtime, which printed a multi-line
    "EP Error" and retried on the CPU; diffrt's line then said only "see ONNX Runtime's log"."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    from diffrt.components import ComponentSpec, TensorSpec
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    _identity_model(tmp_path / "model.onnx", {"x": TensorProto.FLOAT})
    spec = ComponentSpec("identity", (TensorSpec("x", ("batch", 3)),), (TensorSpec("x_out", ("batch", 3)),), ranges={"batch": (1, 2, 4)})
    have = ", ".join(ort.get_available_providers())
    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match=r"identity: ONNX Runtime did not start CUDAExecutionProvider .*; this ONNX "
                                                      rf"Runtime build has no CUDAExecutionProvider \(it has {have}\).*strict mode refuses") as info:
        OnnxRuntimeBackend(tmp_path / "model.onnx", spec, providers=asked, threads=1, strict=True)
    assert "\n" not in str(info.value)
    with caplog.at_level("WARNING"):
        backend = OnnxRuntimeBackend(tmp_path / "model.onnx", spec, providers=asked, threads=1)
    assert backend.providers == ["CPUExecutionProvider"] and backend.missing_providers == ["CUDAExecutionProvider"]
    assert f"has no CUDAExecutionProvider (it has {have})" in caplog.text


def test_onnxruntime_opens_where_the_os_has_no_cpu_affinity(tmp_path, monkeypatch):
    """The bug: the thread count came from os.sched_getaffinity, which macOS does not have, so every
    ONNX Runtime backend failed there with an AttributeError."""
    pytest.importorskip("onnxruntime")
    import os

    from onnx import TensorProto

    from diffrt.components import ComponentSpec, TensorSpec
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    _identity_model(tmp_path / "model.onnx", {"x": TensorProto.FLOAT})
    spec = ComponentSpec("identity", (TensorSpec("x", ("batch", 3)),), (TensorSpec("x_out", ("batch", 3)),), ranges={"batch": (1, 2, 4)})
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert OnnxRuntimeBackend(tmp_path / "model.onnx", spec).run({"x": torch.ones(2, 3)})["x_out"].shape == (2, 3)


def test_onnxruntime_takes_torchs_thread_count_and_does_not_spin_on_the_cpu(tmp_path):
    """From a review: the pool was every CPU whatever OMP_NUM_THREADS or torch.set_num_threads said (a container's
    service could not size it), and its workers spun between runs, slowing the sampler's torch work in between."""
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto

    from diffrt.bench.timing import available_cpus, cpu_threads
    from diffrt.components import ComponentSpec, TensorSpec
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    _identity_model(tmp_path / "model.onnx", {"x": TensorProto.FLOAT})
    spec = ComponentSpec("identity", (TensorSpec("x", ("batch", 3)),), (TensorSpec("x_out", ("batch", 3)),), ranges={"batch": (1, 2, 4)})
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        options = OnnxRuntimeBackend(tmp_path / "model.onnx", spec).session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        torch.set_num_threads(64)  # more than the CPUs (here): capped at those
        assert OnnxRuntimeBackend(tmp_path / "model.onnx", spec).session.get_session_options().intra_op_num_threads \
            == min(64, available_cpus())
    finally:
        torch.set_num_threads(old)
    with cpu_threads(1):
        assert OnnxRuntimeBackend(tmp_path / "model.onnx", spec).session.get_session_options().intra_op_num_threads == 1


def test_a_tensorrt_that_imports_but_cannot_build_is_unavailable_in_one_line(monkeypatch):
    """`pip install tensorrt` may bring a build for another CUDA than the driver's: the module imports, and its
    Builder raises pybind's bare "factory function returned nullptr", so every TensorRT path (and gpu test) failed
    there instead of saying TensorRT is unavailable. Only the probe is exercised here (TensorRT needs a GPU)."""
    import sys
    import types

    def factory_failed(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    logger = type("Logger", (), {"ERROR": 1, "__init__": lambda self, severity: None})
    stub = types.SimpleNamespace(__version__="10.14.1", Builder=factory_failed, Logger=logger)
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backends._tensorrt_library_problem.cache_clear()
    try:
        assert not backends.backend_available("tensorrt")
        with pytest.raises(BackendUnavailableError, match=r"TensorRT 10.14.1 cannot create a builder: .*nullptr .*torch has CUDA"):
            backends.require_backend("tensorrt")
        stub.Builder = lambda logger: object()  # one that builds
        backends._tensorrt_library_problem.cache_clear()
        assert backends.backend_available("tensorrt") and backends.tensorrt_problem() is None
    finally:
        backends._tensorrt_library_problem.cache_clear()


def test_onnxruntime_asks_for_tensorrt_only_where_its_provider_library_loads_beside_it(monkeypatch, tmp_path, caplog):
    """An installed TensorRT of another major than the provider was built for (11 beside a provider linked to
    libnvinfer.so.10) made every session fall back from TensorRT's provider, warned each time (an error with
    --strict). The provider's library is loaded first; here, a file that is not a library stands for one that fails."""
    import sys
    import types

    import onnxruntime

    from diffrt.runtime.backends import onnxruntime as ort_backend

    fake = tmp_path / "onnxruntime"
    (fake / "capi").mkdir(parents=True)
    monkeypatch.setattr(onnxruntime, "__file__", str(fake / "__init__.py"))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.1.0"))
    ort_backend.tensorrt_installed.cache_clear()
    try:
        assert ort_backend.tensorrt_installed()  # no provider library to try: the provider list decides
        (fake / "capi" / "libonnxruntime_providers_tensorrt.so").write_bytes(b"not a shared library")
        ort_backend.tensorrt_installed.cache_clear()
        assert not ort_backend.tensorrt_installed()
        assert "TensorRT provider does not load beside TensorRT 11.1.0" in caplog.text
    finally:
        ort_backend.tensorrt_installed.cache_clear()


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_a_device_the_backend_cannot_run_on_is_refused_at_open(device, backend):
    """From a review: mps, xpu and meta opened, then failed at the first call with torch's or ONNX Runtime's own
    traceback ("Unsupported device type: meta"); ONNX Runtime binds cpu and cuda only."""
    from diffrt.errors import BackendUnavailableError
    from diffrt.runtime.backends import resolve_device

    usable = device == "mps" and torch.backends.mps.is_available() or device == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available()
    if backend == "torch" and usable:
        assert resolve_device(device, backend).type == device  # PyTorch on a Mac's GPU: taken
        return
    if backend == "tensorrt":  # CUDA only, as its own check says (not "pass cpu")
        with pytest.raises(BackendUnavailableError, match=rf"^backend 'tensorrt' runs on a CUDA device, not {device}"):
            resolve_device(device, backend)
        return
    with pytest.raises(BackendUnavailableError, match=rf"^--device {device}: .* runs on cpu or cuda, not {device}; pass cpu or cuda"):
        resolve_device(device, backend)
