"""TensorRT: profiles, the build and engine guards, refit from base weights, and the backend.

CPU tests cover what needs no TensorRT: the profile, typing and failure messages, the manifest
guards (RELIABILITY #1, #2), the unavailable-backend message, and the refit weights themselves
(checked by running them through ONNX Runtime against PyTorch with the LoRA fused). `gpu` tests
build and run real engines and skip without CUDA and TensorRT.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from diffrt.atomic import save_safetensors
from diffrt.components import TensorSpec, ComponentSpec, pixel_unet_spec
from diffrt.errors import ArtifactError, BackendUnavailableError, LoraError, ShapeOutOfRangeError
from diffrt.export import manifest as mf
from diffrt.export.tensorrt import (build_engine, engine_entry, engine_profile, explain_build_failure,
                                    serialize_network, strongly_typed_build)
from diffrt.runtime.backends import available_backends, backend_available


def _tensorrt_ready() -> bool:
    return backend_available("tensorrt")  # CUDA present and `import tensorrt` works


needs_trt = pytest.mark.skipif(not _tensorrt_ready(), reason="needs CUDA and TensorRT")
BATCH = (1, 2, 4)


# --- fixtures: a tiny class-conditioned pixel model, its ONNX, and LoRA files -----------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from diffrt.models import build_pixel_model, save_pixel_model, small_unet_config

    torch.manual_seed(0)
    model = build_pixel_model(small_unet_config(sample_size=8, widths=(8, 16), attention=True),
                              conditioning="class_channels", num_classes=3)
    return save_pixel_model(model, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def onnx_artifact(model_dir, tmp_path_factory) -> Path:
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    return export_pixel_model(model_dir, tmp_path_factory.mktemp("art") / "onnx", ExportOptions(batch=BATCH, verify=False)).folder


# Modules of the UNet2DModel: attention projections (exported as renamed, transposed MatMul
# weights), a 3x3 resnet conv and a 1x1 shortcut conv (exported under their own names).
LORA_TARGETS = ["down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_v", "up_blocks.1.attentions.1.to_out.0",
                "down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv_shortcut"]


def make_lora(model_dir: Path, path: Path, seed: int, targets=LORA_TARGETS, rank: int = 2) -> Path:
    """A peft-format LoRA file (`unet.<module>.lora_A.weight` / `lora_B.weight`) with random weights."""
    from diffrt.models import load_pixel_model

    modules = dict(load_pixel_model(model_dir).unet.unet.named_modules())
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets:
        w = modules[name].weight
        down_shape = (rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1])
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(down_shape, generator=g) * 0.3
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(up_shape, generator=g) * 0.3
    save_safetensors(path, tensors)
    return path


@pytest.fixture(scope="module")
def loras(model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {"A": make_lora(model_dir, folder / "a.safetensors", 1), "B": make_lora(model_dir, folder / "b.safetensors", 2)}


def torch_unet(model_dir: Path, lora: list[tuple[Path, float]] = ()):
    from diffrt.export.lora import read_lora
    from diffrt.export.lora_fuse import fuse_loras
    from diffrt.models import load_pixel_model

    unet = load_pixel_model(model_dir).unet
    if lora:
        fuse_loras({"unet": unet.unet}, [(read_lora(p), s) for p, s in lora])
    return unet


# --- profile, typing, build failures (no TensorRT needed) -------------------------------------------


def test_engine_profile_covers_every_dynamic_input():
    spec = pixel_unet_spec(3, 8, conditioned=True, num_labels=4, batch=(1, 2, 4), size=(8, 16, 32))
    profile = engine_profile(spec)
    assert profile["sample"] == {"min": (1, 3, 8, 8), "opt": (2, 3, 16, 16), "max": (4, 3, 32, 32)}
    assert profile["timestep"] == {"min": (1,), "opt": (2,), "max": (4,)}
    assert profile["class_labels"] == {"min": (1,), "opt": (2,), "max": (4,)}


def test_engine_profile_skips_fixed_inputs_and_refuses_missing_ranges():
    spec = ComponentSpec("vae_decoder", (TensorSpec("latent", (1, 4, 8, 8)), TensorSpec("scale", ("batch",))),
                         (TensorSpec("image", (1, 3, 64, 64)),), ranges={"batch": (1, 1, 2)})
    assert list(engine_profile(spec)) == ["scale"]
    broken = ComponentSpec("unet", (TensorSpec("sample", ("batch", 4, "height", 8)),), (), ranges={"batch": (1, 2, 4)})
    with pytest.raises(ArtifactError, match="'height' has no"):
        engine_profile(broken)


def test_engine_profile_refuses_corners_the_component_would_not_run():
    # multiple_of 4: a profile corner at 6 is a shape the spec refuses at run time (and where a
    # UNet's skip connections stop lining up), so the build is refused before TensorRT sees it.
    spec = pixel_unet_spec(3, 8, conditioned=False, batch=(1, 2, 4), size=(6, 8, 16))
    with pytest.raises(ArtifactError, match=r"'height' \(6, 8, 16\) must hold multiples of 4"):
        engine_profile(spec)
    assert engine_profile(pixel_unet_spec(3, 8, conditioned=False, batch=(1, 3, 5), size=(8, 12, 16)))["sample"]["opt"] == (3, 3, 12, 12)


def test_inputs_off_tensorrt_alignment_are_copied():
    # setTensorAddress wants 256-byte aligned pointers; a view's storage offset can break that.
    from diffrt.runtime.backends.tensorrt import ALIGNMENT, aligned

    base = torch.arange(512, dtype=torch.float32)
    k = next(i for i in range(128) if (base.data_ptr() + 4 * i) % ALIGNMENT == 0)
    on = base[k:k + 64]
    assert aligned(on) is on  # already aligned: no copy
    off = base[k + 1:k + 65]
    copy = aligned(off)
    assert copy.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() and torch.equal(copy, off)
    assert copy.is_contiguous() and copy.storage_offset() == 0


def test_typing_follows_the_onnx_dtype():
    assert strongly_typed_build("fp16", "fp16") is True  # fp16 ONNX: types as exported
    assert strongly_typed_build("fp16", "fp32") is False  # fp32 ONNX: the FP16 flag chooses per layer
    assert strongly_typed_build("fp32", "fp32") is False
    assert strongly_typed_build("bf16", "fp32", strongly_typed=True) is True
    with pytest.raises(ArtifactError, match="fp32 engine"):
        strongly_typed_build("fp32", "fp16")
    with pytest.raises(ArtifactError, match="precision"):
        strongly_typed_build("int8", "fp32")


class _EmptyBuilder:
    """A builder that returns nothing, as TensorRT's does when it runs out of memory, logging what it logs."""

    def __init__(self, errors: list[str], messages: list[str]):
        self.errors, self.messages = errors, messages

    def build_serialized_network(self, network, config):
        self.errors.extend(self.messages)
        return None


@pytest.mark.parametrize("messages, cause", [
    (["Error Code 2: OutOfMemory (Requested size was 8589934592 bytes.)"], "ran out of GPU memory"),
    (["Error Code 10: Internal Error (Could not find any implementation for node /net/unet/down_blocks.0/resnets.0/conv1/Conv.)"], "most often this is out of GPU memory"),
    (["Error Code 9: API Usage Error (op GridSample is not supported with these types)"], "does not support a layer"),
    ([], "built no engine"),
])
def test_a_build_that_returns_nothing_names_the_cause(messages, cause):
    errors: list[str] = ["an older error, from an earlier build"]
    with pytest.raises(ArtifactError) as info:
        serialize_network(_EmptyBuilder(errors, messages), None, None, "unet", errors, 2 * 1024**3, 3 * 1024**3)
    text = str(info.value)
    assert cause in text and "\n" not in text and "unet" in text
    assert "earlier build" not in text  # only this build's errors are reported
    if "conv1" in " ".join(messages):
        assert "node /net/unet/down_blocks.0/resnets.0/conv1/Conv of unet" in text and "2.00 GiB" in text


def test_a_build_reports_its_own_errors_after_the_log_dropped_old_ones():
    """The logger drops its oldest errors past 1000, in place: a build that crossed that line read `errors[start:]`
    at shifted indices, other builds' errors or none of its own."""
    from diffrt.export.tensorrt import ErrorLog

    class Builder:  # logs as TensorRT's logger does, one error at a time, then returns nothing
        def build_serialized_network(self, network, config):
            for i in range(300):
                errors.add(f"Error Code 2: OutOfMemory (Requested size was {i} bytes.)")
            return None

    errors = ErrorLog()
    for i in range(900):
        errors.add(f"an older error {i}, from an earlier build")
    with pytest.raises(ArtifactError) as info:
        serialize_network(Builder(), None, None, "unet", errors, 2 * 1024**3, None)
    assert errors.dropped == 500 and "ran out of GPU memory" in str(info.value) and "earlier build" not in str(info.value)
    assert errors.since(900) == [f"Error Code 2: OutOfMemory (Requested size was {i} bytes.)" for i in range(300)]


def test_explain_build_failure_is_one_line():
    assert "\n" not in explain_build_failure("unet", ["line one\nline two"], 1024**3, None)


@pytest.mark.skipif(_tensorrt_ready(), reason="TensorRT is available here")
def test_build_engine_without_tensorrt_says_so_in_one_line(onnx_artifact, tmp_path):
    spec = pixel_unet_spec(3, 8, conditioned=True, num_labels=4, batch=BATCH)
    with pytest.raises(BackendUnavailableError) as info:
        build_engine(onnx_artifact / "unet" / "model.onnx", spec, tmp_path / "engine.plan", precision="fp32")
    text = str(info.value)
    assert "\n" not in text and "tensorrt" in text
    assert all(name in text for name in available_backends())
    assert not (tmp_path / "engine.plan").exists()


# --- manifest guards (RELIABILITY #1, #2) ------------------------------------------------------------

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture
def entry(tmp_path, monkeypatch) -> dict:
    """An engine entry as build_engine writes it, on a machine faked to have TensorRT 10.3.0 on an H100."""
    versions = {**mf.library_versions(), "tensorrt": "10.3.0"}
    monkeypatch.setattr(mf, "library_versions", lambda: versions)
    monkeypatch.setattr(mf, "gpu_identity", lambda device=None: dict(H100))
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"engine")
    spec = pixel_unet_spec(3, 8, conditioned=False, batch=BATCH)
    return engine_entry("10.3.0", dict(H100), "fp16", spec, strongly_typed=True, workspace_bytes=1, timing_cache=tmp_path / "t.cache",
                        timing_cache_loaded=False, build_seconds=1.0, engine_path=plan)


def test_engine_built_here_is_accepted(entry):
    mf.check_engine_compatible(entry)  # the control: the guard can pass
    assert entry["refittable"] and entry["profiles"]["sample"]["max"] == [4, 3, 8, 8]


def test_engine_from_another_tensorrt_is_refused(entry):
    with pytest.raises(ArtifactError, match=r"TensorRT 10\.0\.1.*10\.3\.0"):
        mf.check_engine_compatible({**entry, "tensorrt": "10.0.1"})


def test_engine_from_another_gpu_is_refused(entry):
    with pytest.raises(ArtifactError, match="A100"):
        mf.check_engine_compatible({**entry, "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}})
    with pytest.raises(ArtifactError):  # same name, other compute capability
        mf.check_engine_compatible({**entry, "gpu": {**H100, "compute_capability": "8.9"}})


def test_the_gpu_identity_is_its_name_and_compute_capability_and_keys_the_export(monkeypatch):
    """RELIABILITY #2 from the device's own properties: another compute capability under the same
    name, or another name, is another GPU, so a TensorRT export made on one is a cache miss on the other."""
    from types import SimpleNamespace

    from diffrt.export.cache import export_key
    from diffrt.export.options import ExportOptions

    props = {"name": H100["name"], "major": 9, "minor": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(**props))
    assert mf.gpu_identity() == H100

    def key() -> str:
        return export_key({"source": "the same weights"}, ExportOptions(backend="tensorrt"))

    here = key()
    assert key() == here  # the control: the same device, the same key
    props.update(major=8, minor=9)
    assert mf.gpu_identity() == {**H100, "compute_capability": "8.9"} and key() != here
    props.update(name="NVIDIA A100-SXM4-80GB", major=9, minor=0)
    assert key() != here
    # A machine with GPUs of two models: an engine is checked against the GPU it is opened on, not the current one.
    models = {0: SimpleNamespace(name=H100["name"], major=9, minor=0), 1: SimpleNamespace(name="NVIDIA L4", major=8, minor=9)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: models[index])
    assert mf.gpu_identity("cuda:1") == {"name": "NVIDIA L4", "compute_capability": "8.9"} and mf.gpu_identity() == H100
    assert mf.gpu_identity("cpu") is None


def test_a_foreign_engine_is_refused_before_it_is_loaded_or_refit(entry, tmp_path, monkeypatch):
    """RELIABILITY #1, #2 where they matter: opening an artifact's engine and refitting it check its
    TensorRT and GPU first, so an engine from another version or GPU never reaches TensorRT."""
    from diffrt.components import spec_to_dict
    from diffrt.export import refit
    from diffrt.runtime import loading
    from diffrt.runtime.backends import tensorrt as trt_backend

    def to_tensorrt(*args, **kwargs):
        raise AssertionError("the engine was handed to TensorRT")

    def past_the_check(*args, **kwargs):
        raise AssertionError("the refit went on past the engine check")

    monkeypatch.setattr(trt_backend, "TensorRTBackend", to_tensorrt)
    monkeypatch.setattr(refit, "read_weight_map", past_the_check)  # the refit's first step after the check
    spec = spec_to_dict(pixel_unet_spec(3, 8, conditioned=False, batch=BATCH))

    def manifest(engine: dict) -> dict:
        return {"loras": [], "onnx_loras": [], "components": {"unet": {"spec": spec, "engine": engine, "files": {}}}}

    a100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    for engine, names in (({**entry, "tensorrt": "10.0.1"}, r"TensorRT 10\.0\.1"), ({**entry, "gpu": a100}, "A100")):
        with pytest.raises(ArtifactError, match=names):
            loading.open_component(tmp_path, manifest(engine), "unet", "tensorrt", "cuda")
        with pytest.raises(ArtifactError, match=names):
            refit.refit_components(tmp_path, manifest(engine), [])
    # The control: this machine's engine gets through the check, to TensorRT and to the refit proper.
    with pytest.raises(AssertionError, match="handed to TensorRT"):
        loading.open_component(tmp_path, manifest(entry), "unet", "tensorrt", "cuda")
    with pytest.raises(AssertionError, match="past the engine check"):
        refit.refit_components(tmp_path, manifest(entry), [])


# --- refit weights (CPU: checked through ONNX Runtime) ---------------------------------------------


@pytest.fixture(scope="module")
def weight_map(onnx_artifact, model_dir):
    from diffrt.export.refit import build_weight_map
    from diffrt.models import load_pixel_model

    return build_weight_map(onnx_artifact / "unet" / "model.onnx", {"unet": load_pixel_model(model_dir).unet.unet})


def test_weight_map_finds_every_lora_patchable_weight(weight_map):
    assert weight_map["unlocated"] == [] and weight_map["ambiguous"] == {}
    by_param = {e["param"]: (name, e["transpose"]) for name, e in weight_map["weights"].items()}
    name, transpose = by_param["down_blocks.1.attentions.0.to_q.weight"]
    assert transpose and not name.endswith("to_q.weight")  # the exporter renamed and transposed it
    assert by_param["down_blocks.0.resnets.0.conv1.weight"] == ("net.unet.down_blocks.0.resnets.0.conv1.weight", False)


def _onnx_with(onnx_artifact: Path, weights, out: Path) -> Path:
    """A copy of the artifact's ONNX with these initializer values (what a refit does to an engine)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_artifact / "unet" / "model.onnx"))
    for init in model.graph.initializer:
        if init.name in weights.patched:
            init.CopyFrom(numpy_helper.from_array(weights.weights[init.name].numpy(), init.name))
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    return out / "model.onnx"


def _ort_run(onnx_path: Path, feed):
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    spec = pixel_unet_spec(3, 8, conditioned=True, num_labels=4, batch=BATCH)
    return OnnxRuntimeBackend(onnx_path, spec, threads=1).run(feed)["noise_pred"]


def test_refit_weights_match_pytorch_with_the_lora_fused(onnx_artifact, model_dir, weight_map, loras, tmp_path):
    from diffrt.export.lora import read_lora
    from diffrt.export.refit import refit_weights

    spec = pixel_unet_spec(3, 8, conditioned=True, num_labels=4, batch=BATCH)
    feed = spec.example_feed("opt", seed=3)
    weights = refit_weights(onnx_artifact / "unet" / "model.onnx", weight_map, [(read_lora(loras["A"]), 0.8)])
    assert len(weights.patched) == len(LORA_TARGETS)
    got = _ort_run(_onnx_with(onnx_artifact, weights, tmp_path / "a"), feed)
    with torch.no_grad():
        want = torch_unet(model_dir, [(loras["A"], 0.8)])(*feed.values())
        base = torch_unet(model_dir)(*feed.values())
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_refit_refuses_a_lora_on_an_unmapped_weight(onnx_artifact, weight_map, model_dir, loras, tmp_path):
    from diffrt.export.lora import read_lora
    from diffrt.export.refit import refit_weights

    crippled = {**weight_map, "weights": {n: e for n, e in weight_map["weights"].items()
                                          if e["param"] != "mid_block.attentions.0.to_v.weight"}}
    with pytest.raises(ArtifactError, match="mid_block.attentions.0.to_v"):
        refit_weights(onnx_artifact / "unet" / "model.onnx", crippled, [(read_lora(loras["A"]), 1.0)])
    foreign = make_lora(model_dir, tmp_path / "foreign.safetensors", 5, targets=["conv_in"])
    save_safetensors(foreign, {"unet.no_such_block.to_q.lora_A.weight": torch.ones(2, 8),
                               "unet.no_such_block.to_q.lora_B.weight": torch.ones(8, 2)})
    with pytest.raises(LoraError, match="no_such_block"):
        refit_weights(onnx_artifact / "unet" / "model.onnx", weight_map, [(read_lora(foreign), 1.0)])


def test_refit_artifact_refusals(onnx_artifact, model_dir, loras, tmp_path, monkeypatch):
    from diffrt.export import refit
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.export.refit import refit_artifact

    monkeypatch.setattr(refit, "require_backend", lambda name: None)  # past the TensorRT check, to the artifact's

    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        refit_artifact(onnx_artifact, [(loras["A"], 1.0)])
    baked = export_pixel_model(model_dir, tmp_path / "baked", ExportOptions(batch=BATCH, verify=False, loras=[(str(loras["B"]), 1.0)])).folder
    with pytest.raises(ArtifactError, match="baked in"):
        refit_artifact(baked, [(loras["A"], 1.0)])


# --- GPU: real engines -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_artifact(model_dir, tmp_path_factory) -> Path:
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    return export_pixel_model(model_dir, tmp_path_factory.mktemp("trt") / "fp32", ExportOptions(backend="tensorrt", batch=BATCH)).folder


def _backend(folder: Path, **kwargs):
    from diffrt.components import spec_from_dict
    from diffrt.runtime.backends.tensorrt import TensorRTBackend

    spec = spec_from_dict(mf.read_manifest(folder)["components"]["unet"]["spec"])
    return TensorRTBackend(folder / "unet" / "engine.plan", spec, device="cuda", **kwargs)


def _reference(model_dir: Path, feed, lora=()):
    # On the CPU, as export's own parity check runs it: on CUDA, PyTorch's convolutions default to
    # TF32 (torch.backends.cudnn.allow_tf32), 10-bit mantissas against an fp32 engine built with TF32
    # cleared, and the 1e-3 comparisons below would measure PyTorch's rounding, not TensorRT's.
    with torch.no_grad():
        return torch_unet(model_dir, lora)(*(t.cpu() for t in feed.values())).float().cuda()


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return bool((got.float() - want).abs().max() <= rel * want.abs().max())


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_matches_pytorch_fp32(trt_artifact, model_dir, cuda_graph):
    backend = _backend(trt_artifact, cuda_graph=cuda_graph)
    for which, seed in (("min", 0), ("opt", 1), ("max", 2), ("opt", 3)):
        feed = backend.spec.example_feed(which, device="cuda", seed=seed)
        out = backend.run(feed)["noise_pred"]
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert _close(out, _reference(model_dir, feed), 1e-3)


@pytest.mark.gpu
@needs_trt
def test_an_engine_from_the_dynamo_exporters_graph_matches_pytorch_and_refits(model_dir, loras, tmp_path):
    """TensorRT parses the torch.export-based exporter's graph (opset 18) and refits it from its base weights."""
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.export.refit import refit_artifact

    folder = export_pixel_model(model_dir, tmp_path / "dynamo", ExportOptions(backend="tensorrt", batch=BATCH, exporter="dynamo")).folder
    feed = _backend(folder).spec.example_feed("opt", device="cuda", seed=4)
    assert _close(_backend(folder).run(feed)["noise_pred"], _reference(model_dir, feed), 1e-3)
    refit_artifact(folder, [(loras["A"], 0.8)])
    assert _close(_backend(folder).run(feed)["noise_pred"], _reference(model_dir, feed, [(loras["A"], 0.8)]), 1e-3)


@pytest.mark.gpu
@needs_trt
def test_engine_matches_pytorch_fp16(model_dir, tmp_path):
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    options = ExportOptions(backend="tensorrt", precision="fp16", batch=BATCH, workspace_gb=1.5)
    folder = export_pixel_model(model_dir, tmp_path / "fp16", options).folder
    engine = mf.read_manifest(folder)["components"]["unet"]["engine"]
    assert engine["precision"] == "fp16" and engine["typing"] == "strong"
    assert engine["workspace_bytes"] == int(1.5 * 1024**3)  # --workspace-gb reaches the builder
    backend = _backend(folder)
    feed = backend.spec.example_feed("opt", device="cuda", seed=4)
    assert _close(backend.run(feed)["noise_pred"], _reference(model_dir, feed), 2e-2)


@pytest.mark.gpu
@needs_trt
def test_engine_parity_is_measured_and_recorded(trt_artifact):
    parity = mf.read_manifest(trt_artifact)["components"]["unet"]["parity"]
    assert parity["onnxruntime"]["passed"] and parity["tensorrt"]["passed"]
    assert parity["tensorrt"]["precision"] == "fp32" and parity["tensorrt"]["max_rel"] <= parity["tensorrt"]["tolerance"]
    assert {"max_abs", "median_abs", "cosine", "shapes"} <= set(parity["tensorrt"]) and parity["tensorrt"]["weights"] == "base"


@pytest.mark.gpu
@needs_trt
def test_bf16_parity_is_measured_on_the_engine(model_dir, tmp_path):
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    folder = export_pixel_model(model_dir, tmp_path / "bf16", ExportOptions(backend="tensorrt", precision="bf16", batch=BATCH)).folder
    parity = mf.read_manifest(folder)["components"]["unet"]["parity"]
    assert "onnxruntime" not in parity  # ONNX Runtime has no bf16 Conv on the CPU
    assert parity["tensorrt"]["passed"] and parity["tensorrt"]["precision"] == "bf16"
    # What the manifest says, checked on the engine itself against fp32 PyTorch, at bf16's tolerance.
    backend = _backend(folder)
    feed = backend.spec.example_feed("opt", device="cuda", seed=4)
    assert _close(backend.run(feed)["noise_pred"], _reference(model_dir, feed), 5e-2)


@pytest.mark.gpu
@needs_trt
def test_tensorrt_export_with_lora_runs_it_and_keeps_the_base_key(trt_artifact, model_dir, loras, tmp_path):
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions

    options = ExportOptions(backend="tensorrt", batch=BATCH, loras=[(str(loras["A"]), 0.8)])
    folder = export_pixel_model(model_dir, tmp_path / "lora", options).folder
    manifest = mf.read_manifest(folder)
    assert manifest["key"] == mf.read_manifest(trt_artifact)["key"] and manifest["onnx_loras"] == []
    feed = _backend(folder).spec.example_feed("opt", device="cuda", seed=6)
    assert _close(_backend(folder).run(feed)["noise_pred"], _reference(model_dir, feed, [(loras["A"], 0.8)]), 1e-3)
    assert export_pixel_model(model_dir, folder, options).cache_hit


@pytest.mark.gpu
@needs_trt
def test_out_of_range_shapes_get_the_typed_error(trt_artifact):
    backend = _backend(trt_artifact)
    with pytest.raises(ShapeOutOfRangeError, match="batch"):
        backend.run(backend.spec.example_feed("max", device="cuda", batch=BATCH[2] + 1))
    with pytest.raises(ShapeOutOfRangeError, match="height"):
        backend.run(backend.spec.example_feed("opt", device="cuda", height=16, width=16))


@pytest.mark.gpu
@needs_trt
def test_refit_a_b_a_equals_a(trt_artifact, model_dir, loras, tmp_path):
    import shutil

    from diffrt.export.refit import refit_artifact

    folder = tmp_path / "refit"
    shutil.copytree(trt_artifact, folder)
    feed = _backend(folder).spec.example_feed("opt", device="cuda", seed=5)
    base = _backend(folder).run(feed)["noise_pred"].clone()
    outputs = []
    for name in "ABA":
        report = refit_artifact(folder, [(loras[name], 0.8)])
        assert report["components"]["unet"]["patched"] == len(LORA_TARGETS)
        outputs.append(_backend(folder).run(feed)["noise_pred"].clone())  # a fresh backend on the refit engine
    a, b, a_again = outputs
    assert torch.equal(a, a_again)
    assert not torch.equal(a, b) and not torch.equal(a, base)
    assert _close(a, _reference(model_dir, feed, [(loras["A"], 0.8)]), 1e-3)
    manifest = mf.read_manifest(folder)
    assert [x["sha256"] for x in manifest["loras"]] == [manifest["components"]["unet"]["engine"]["loras"][0]["sha256"]]
    refit_artifact(folder, [])  # no LoRA: back to base, and to the export's cache key
    assert torch.equal(_backend(folder).run(feed)["noise_pred"], base)
    assert mf.read_manifest(folder)["key"] == mf.read_manifest(trt_artifact)["key"]


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_backend_refit_in_memory_swaps_the_running_engines_lora(trt_artifact, model_dir, loras, cuda_graph):
    """lora_scale's EngineLora calls backend.refit: the loaded engine (and any captured graph) runs
    the new weights at once, back to base gives the base bit for bit, and the file is untouched."""
    from diffrt.atomic import sha256_file
    from diffrt.export.lora import read_lora
    from diffrt.export.refit import read_weight_map, refit_weights

    onnx_path, plan = trt_artifact / "unet" / "model.onnx", trt_artifact / "unet" / "engine.plan"
    digest, wmap = sha256_file(plan), read_weight_map(onnx_path)
    backend = _backend(trt_artifact, cuda_graph=cuda_graph)
    feed = backend.spec.example_feed("opt", device="cuda", seed=8)
    base = backend.run(feed)["noise_pred"].clone()  # with cuda_graph: captured on the base weights
    report = backend.refit(refit_weights(onnx_path, wmap, [(read_lora(loras["A"]), 0.8)]))
    assert report["patched"] == len(LORA_TARGETS)
    assert _close(backend.run(feed)["noise_pred"], _reference(model_dir, feed, [(loras["A"], 0.8)]), 1e-3)
    backend.refit(refit_weights(onnx_path, wmap, []))
    assert torch.equal(backend.run(feed)["noise_pred"], base)
    assert sha256_file(plan) == digest


@pytest.mark.gpu
@needs_trt
def test_a_refit_through_one_backend_reaches_the_graphs_of_its_clones(trt_artifact, model_dir, loras):
    """Clones share the engine: a graph a clone captured on the old weights is dropped and captured
    again after a refit made through another backend of that engine, as the refitting one's are."""
    from diffrt.export.lora import read_lora
    from diffrt.export.refit import read_weight_map, refit_weights

    onnx_path = trt_artifact / "unet" / "model.onnx"
    wmap = read_weight_map(onnx_path)
    backend = _backend(trt_artifact, cuda_graph=True)
    twin = backend.clone()
    feed = backend.spec.example_feed("opt", device="cuda", seed=9)
    base = twin.run(feed)["noise_pred"].clone()
    assert twin.replays_graphs, "no CUDA graph was captured (see the warning logged), so this tests nothing"
    backend.refit(refit_weights(onnx_path, wmap, [(read_lora(loras["A"]), 0.8)]))
    assert _close(twin.run(feed)["noise_pred"], _reference(model_dir, feed, [(loras["A"], 0.8)]), 1e-3)
    backend.refit(refit_weights(onnx_path, wmap, []))
    assert torch.equal(twin.run(feed)["noise_pred"], base)


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("shared", [True, False])
def test_concurrent_threads_equal_serial(trt_artifact, shared):
    backend = _backend(trt_artifact)
    feeds = [backend.spec.example_feed("opt", device="cuda", seed=s) for s in range(8)]
    serial = [backend.run(f)["noise_pred"].clone() for f in feeds]
    results: dict[int, torch.Tensor] = {}

    def worker(i: int, b) -> None:
        for _ in range(5):
            results[i] = b.run(feeds[i])["noise_pred"].clone()
        torch.cuda.current_stream().synchronize()

    threads = [threading.Thread(target=worker, args=(i, backend if shared else backend.clone())) for i in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], serial[i]) for i in range(len(feeds)))


@pytest.mark.gpu
@needs_trt
def test_timing_cache_is_reused_by_a_second_build(onnx_artifact, tmp_path):
    spec = pixel_unet_spec(3, 8, conditioned=True, num_labels=4, batch=BATCH)
    cache = tmp_path / "timing.cache"
    onnx_path = onnx_artifact / "unet" / "model.onnx"
    first = build_engine(onnx_path, spec, tmp_path / "a.plan", precision="fp32", timing_cache=cache)
    assert not first["timing_cache_loaded"] and cache.stat().st_size > 0
    second = build_engine(onnx_path, spec, tmp_path / "b.plan", precision="fp32", timing_cache=cache)
    assert second["timing_cache_loaded"] and second["timing_cache"] == str(cache)
