"""The timestep stays fp32 in fp16 and bf16 exports (components.TensorSpec.pinned).

A half-precision `timestep` input made every backend round the timestep before the UNet saw it:
bf16 turns 999 into 1000 and 981 into 980, fp16 a fractional timestep (998.73, Euler's linspace and
Karras schedules) into 998.5, and the sinusoidal time embedding moves by up to 1 rad per step.
diffusers computes that embedding in fp32 from an fp32 timestep for half UNets and ControlNets too,
so the reference is the half model fed the fp32 timestep. Here: every half graph (pixel UNet, text-
to-image UNet, fused UNet+ControlNet, ControlNet alone; both exporters) declares an fp32 timestep
and matches that reference; fp32 exports keep their cache keys (hours of engine builds), half ones
get new keys; and an artifact exported before the fix (half timestep) still loads and runs as it did.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import T2I_RANGES
from diffrt import components
from diffrt.components import ComponentSpec, TensorSpec, spec_from_dict, spec_to_dict
from diffrt.export import manifest as mf
from diffrt.export.artifact import export_pixel_model, pixel_export_key, pixel_spec
from diffrt.export.options import ExportOptions
from diffrt.export.onnx import EXPORTERS, export_onnx
from diffrt.export.verify import TOLERANCE, compare
from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

ONNX_FLOAT, ONNX_FLOAT16, ONNX_BFLOAT16 = 1, 10, 16  # onnx.TensorProto elem types
HALF = {"fp16": (torch.float16, ONNX_FLOAT16, 998.73), "bf16": (torch.bfloat16, ONNX_BFLOAT16, 999.0)}
PIXEL = ExportOptions(batch=(1, 2, 8))


def pre_fix(spec: ComponentSpec) -> ComponentSpec:
    """`spec` as diffrt wrote it before the pin: the timestep follows the precision."""
    return dataclasses.replace(spec, inputs=tuple(TensorSpec(t.name, t.dims, t.dtype, t.high) for t in spec.inputs))


def unpinned_timestep() -> TensorSpec:
    return TensorSpec("timestep", ("batch",))


def input_types(path) -> dict[str, int]:
    import onnx

    return {v.name: v.type.tensor_type.elem_type for v in onnx.load(str(path), load_external_data=False).graph.input}


def run_graph(path, spec: ComponentSpec, feed: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The graph on ONNX Runtime, which casts each feed to the type the graph declares; bf16 graphs on
    onnx's reference evaluator, since ONNX Runtime has no bf16 Conv on the CPU (the same casts, by hand)."""
    if dtype != torch.bfloat16:
        return OnnxRuntimeBackend(path, spec, threads=1).run(feed)
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    ml_dtypes = pytest.importorskip("ml_dtypes")
    numpy_types = {ONNX_FLOAT: np.float32, ONNX_BFLOAT16: ml_dtypes.bfloat16, 7: np.int64}
    types = input_types(path)
    arrays = {name: t.numpy().astype(numpy_types[types[name]]) for name, t in feed.items()}
    outs = ReferenceEvaluator(onnx.load(str(path))).run(None, arrays)
    return {name: torch.from_numpy(np.asarray(o, dtype=np.float32)) for name, o in zip(spec.output_names, outs)}


def half_references(module, spec: ComponentSpec, feed: dict[str, torch.Tensor], dtype: torch.dtype):
    """The half module's outputs fed the fp32 timestep (diffusers' way, the reference) and fed the
    timestep rounded to `dtype` (what a graph with a half timestep input computes)."""
    half = copy.deepcopy(module).to(dtype).eval()

    def run(timestep_dtype):
        args = [feed[n].to(timestep_dtype if n == "timestep" else dtype) if feed[n].is_floating_point() else feed[n]
                for n in spec.input_names]
        with torch.no_grad():
            out = half(*args)
        return dict(zip(spec.output_names, out if isinstance(out, (tuple, list)) else (out,)))

    return run(torch.float32), run(dtype)


def check_matches_the_half_model(module, spec, path, feed, precision):
    dtype = HALF[precision][0]
    got = run_graph(path, spec, feed, dtype)
    reference, rounded = half_references(module, spec, feed, dtype)
    errors = {name: compare(reference[name], got[name]).max_rel for name in spec.output_names}
    assert max(errors.values()) <= TOLERANCE[precision], errors
    # The discriminating check: the graph computes the fp32-timestep model, not the rounded one (before
    # the fix it was the other way round, within the tolerance above at t = 999). Over all outputs: a
    # ControlNet's first residual comes before any time embedding and is the same for both.
    off = {name: compare(rounded[name], got[name]).max_rel for name in spec.output_names}
    assert max(errors.values()) < max(off.values()), (errors, off)


# --- pixel UNet ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel(uncond_model_dir):
    from diffrt.models import load_pixel_model

    model = load_pixel_model(uncond_model_dir)
    return model, pixel_spec(model, PIXEL)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_half_pixel_export_takes_an_fp32_timestep_and_computes_the_half_model(pixel, tmp_path, exporter, precision):
    model, spec = pixel
    dtype, half_type, t = HALF[precision]
    path = export_onnx(model.unet, spec, tmp_path / "unet", dtype=dtype, exporter=exporter)
    assert input_types(path) == {"sample": half_type, "timestep": ONNX_FLOAT}
    feed = {"sample": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)), "timestep": torch.full((2,), t)}
    check_matches_the_half_model(model.unet, spec, path, feed, precision)


def test_the_pixel_spec_pins_the_timestep_to_fp32_in_every_precision(pixel):
    _, spec = pixel
    timestep = next(t for t in spec.inputs if t.name == "timestep")
    assert timestep.pinned and all(timestep.torch_dtype(d) == torch.float32 for d in (torch.float16, torch.bfloat16))
    feed = spec.example_feed("opt", dtype=torch.float16)
    assert feed["timestep"].dtype == torch.float32 and feed["sample"].dtype == torch.float16
    assert spec_from_dict(spec_to_dict(spec)) == spec  # the manifest's form keeps the pin


# --- text-to-image ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2i(t2i_folder):
    from diffrt.text_to_image_models import component_specs, load_text_to_image

    model = load_text_to_image(t2i_folder, t2i_folder / "controlnet")
    return model, component_specs(model, ["unet", "unet_controlnet", "controlnet"], **T2I_RANGES)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["unet", "unet_controlnet", "controlnet"])
def test_half_text_to_image_graphs_take_an_fp32_timestep_and_compute_the_half_model(t2i, tmp_path, exporter, name):
    model, specs = t2i
    spec = specs[name]
    path = export_onnx(model.module(name), spec, tmp_path / name, dtype=torch.float16, exporter=exporter)
    types = input_types(path)
    assert types.pop("timestep") == ONNX_FLOAT
    assert set(types.values()) == {ONNX_FLOAT16}  # everything else as before: the precision's type
    feed = spec.example_feed("opt", seed=3)
    feed["timestep"] = torch.full_like(feed["timestep"], HALF["fp16"][2])
    check_matches_the_half_model(model.module(name), spec, path, feed, "fp16")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_bf16_fused_unet_controlnet_graph_takes_an_fp32_timestep(t2i, tmp_path, exporter):
    model, specs = t2i
    path = export_onnx(model.module("unet_controlnet"), specs["unet_controlnet"], tmp_path / "unet_controlnet",
                       dtype=torch.bfloat16, exporter=exporter)
    types = input_types(path)
    assert types.pop("timestep") == ONNX_FLOAT and set(types.values()) == {ONNX_BFLOAT16}


def test_the_torch_backend_feeds_a_half_model_the_fp32_timestep(t2i):
    """The eager reference (benchmarks, fallbacks) runs a half UNet as diffusers does, as the graphs now do."""
    from diffrt.runtime.backends.torch_eager import TorchBackend

    model, specs = t2i
    spec = specs["unet"]
    feed = spec.example_feed("opt", seed=3)
    feed["timestep"] = torch.full_like(feed["timestep"], 998.73)
    reference, _ = half_references(model.module("unet"), spec, feed, torch.float16)
    backend = TorchBackend(copy.deepcopy(model.module("unet")), spec, dtype=torch.float16)
    assert torch.equal(backend.run(feed)["noise_pred"], reference["noise_pred"])


# --- cache keys and artifacts from before the fix --------------------------------------------------


def test_fp32_keys_are_those_from_before_the_pin_and_half_keys_are_new(pixel):
    """spec_to_dict at fp32 is the pre-fix dict, so an fp32 key is unchanged; at half it names the pin."""
    _, spec = pixel
    old = pre_fix(spec)
    assert spec_to_dict(spec, torch.float32) == spec_to_dict(old)
    assert all("pinned" not in t for t in spec_to_dict(spec, torch.float32)["inputs"])
    assert {"name": "timestep", "dims": ["batch"], "dtype": "float32", "high": 10, "pinned": True} in \
        spec_to_dict(spec, torch.float16)["inputs"]
    source = "0" * 64
    for precision in ("fp32", "fp16", "bf16"):
        options = dataclasses.replace(PIXEL, precision=precision)
        same = pixel_export_key(source, spec, options) == pixel_export_key(source, old, options)
        assert same == (precision == "fp32"), precision


def test_an_fp32_text_to_image_artifact_from_before_the_fix_is_still_a_cache_hit(t2i_folder, tmp_path, monkeypatch):
    from diffrt.export.text_to_image import export_text_to_image

    out, options = tmp_path / "artifact", ExportOptions(verify=False, **T2I_RANGES)
    with monkeypatch.context() as m:
        m.setattr(components, "timestep_spec", unpinned_timestep)  # diffrt as it was
        before = export_text_to_image(t2i_folder, out, options, [str(t2i_folder / "controlnet")])
    assert "pinned" not in str(before.manifest["components"]["unet_controlnet"]["spec"])
    again = export_text_to_image(t2i_folder, out, options, [str(t2i_folder / "controlnet")])
    assert again.cache_hit and again.manifest["key"] == before.manifest["key"]


def test_a_half_artifact_from_before_the_fix_still_runs_and_a_new_export_replaces_it(uncond_model_dir, tmp_path, monkeypatch):
    """Its graph takes a half timestep: the backend casts to that, as before (rounding included), and
    the pipeline runs; exporting again with the fix is a cache miss that writes an fp32 timestep."""
    from diffrt.runtime.loading import artifact_pixel_pipeline

    out, options = tmp_path / "artifact", dataclasses.replace(PIXEL, precision="fp16")
    with monkeypatch.context() as m:
        m.setattr(components, "timestep_spec", unpinned_timestep)  # diffrt as it was
        old = export_pixel_model(uncond_model_dir, out, options)
    assert input_types(out / "unet" / "model.onnx")["timestep"] == ONNX_FLOAT16
    assert "pinned" not in str(old.manifest["components"]["unet"]["spec"])

    pipe = artifact_pixel_pipeline(out, "onnxruntime", "cpu")
    images = pipe(num_images=2, num_inference_steps=2, seed=0, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    spec = pipe.unet.spec
    feed = {"sample": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)), "timestep": torch.full((2,), 998.73)}
    from diffrt.models import load_pixel_model

    _, rounded = half_references(load_pixel_model(uncond_model_dir).unet, spec, feed, torch.float16)
    assert compare(rounded["noise_pred"], pipe.unet.run(feed)["noise_pred"]).max_rel <= 5e-3  # as before: t rounded to 998.5

    new = export_pixel_model(uncond_model_dir, out, options)
    assert not new.cache_hit and new.manifest["key"] != old.manifest["key"]
    assert input_types(out / "unet" / "model.onnx")["timestep"] == ONNX_FLOAT
    assert mf.read_manifest(out)["components"]["unet"]["parity"]["onnxruntime"]["passed"]


def test_a_half_graph_reads_as_half_to_tensorrt_whatever_the_place_of_its_fp32_timestep(tmp_path):
    """The engine builder types a half graph strongly from its float inputs; the fp32 timestep among
    them must not make a graph whose first float input it is read as fp32 (weak typing, fp16 flag)."""
    import onnx
    from onnx import TensorProto, helper

    from diffrt.export.tensorrt import onnx_float_type

    def graph(inputs: list[tuple[str, int]]):
        values = [helper.make_tensor_value_info(n, t, ["batch"]) for n, t in inputs]
        nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _ in inputs]
        outputs = [helper.make_tensor_value_info(f"{n}_out", t, ["batch"]) for n, t in inputs]
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", values, outputs)), str(path))
        return path

    assert onnx_float_type(graph([("timestep", TensorProto.FLOAT), ("sample", TensorProto.FLOAT16)])) == "fp16"
    assert onnx_float_type(graph([("sample", TensorProto.BFLOAT16), ("timestep", TensorProto.FLOAT)])) == "bf16"
    assert onnx_float_type(graph([("sample", TensorProto.FLOAT), ("timestep", TensorProto.FLOAT)])) == "fp32"
    assert onnx_float_type(graph([("ids", TensorProto.INT64), ("timestep", TensorProto.FLOAT)])) == "fp32"
