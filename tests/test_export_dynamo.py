"""`--exporter dynamo`: PyTorch's torch.export-based ONNX exporter, beside the deprecated TorchScript
tracer. Every component it writes must meet the same bar as the tracer's (parity with PyTorch
across the declared ranges, the ControlNet pipeline's images, LoRA refit weights), and the
exporter is part of the cache key."""

from __future__ import annotations

import pytest
import torch

from conftest import T2I_RANGES
from diffrt.cli import main
from diffrt.errors import DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.artifact import export_pixel_model
from diffrt.export.options import ExportOptions
from diffrt.export.text_to_image import export_text_to_image
from diffrt.export.verify import compare

DYNAMO = dict(exporter="dynamo")


@pytest.fixture(scope="module")
def dynamo_t2i_artifact(t2i_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamo") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**DYNAMO, **T2I_RANGES), [str(t2i_folder / "controlnet")])
    return out


def test_every_text_to_image_component_matches_pytorch_across_its_ranges(dynamo_t2i_artifact, t2i_folder):
    """Each graph, run here on ONNX Runtime at the min, opt and max shapes of its ranges, gives PyTorch's outputs; and
    the export's own parity report, which the manifest keeps, says so too (a review found that report alone was
    checked: an export that compared PyTorch with itself passed)."""
    from diffrt.runtime.backends.torch_eager import TorchBackend
    from diffrt.runtime.loading import open_component
    from diffrt.text_to_image_models import load_text_to_image

    manifest = mf.read_manifest(dynamo_t2i_artifact)
    assert manifest["exporter"] == "dynamo" and manifest["opset"] >= 18
    assert set(manifest["components"]) == {"text_encoder", "unet_controlnet", "controlnet", "vae_decoder"}
    model = load_text_to_image(t2i_folder, t2i_folder / "controlnet")
    for name, comp in manifest["components"].items():
        graph = open_component(dynamo_t2i_artifact, manifest, name, "onnxruntime")
        eager = TorchBackend(model.module(name), graph.spec)
        for point in ("min", "opt", "max"):
            feed = graph.spec.example_feed(point, seed=3)
            got, want = graph.run(feed), eager.run(feed)
            assert want.keys() == got.keys()
            for output in want:
                assert compare(want[output], got[output]).max_rel <= 1e-4, (name, point, output)
        parity = comp["parity"]["onnxruntime"]
        assert parity["passed"] and parity["max_rel"] <= 1e-4, (name, parity)


def test_the_controlnet_pipeline_on_dynamo_graphs_equals_pytorch_and_the_tracer(t2i_folder, t2i_artifact,
                                                                               dynamo_t2i_artifact):
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, seed=2, control_image=control,
                  controlnet_conditioning_scale=1.2, num_images_per_prompt=2, output_type="pt")
    torch_images = open_text_to_image_pipeline(t2i_folder, "torch", "cpu", controlnet=t2i_folder / "controlnet")(
        "a photo of the cat", **kwargs).images
    dynamo = open_text_to_image_pipeline(dynamo_t2i_artifact, "onnxruntime", "cpu")("a photo of the cat", **kwargs).images
    traced = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", "cpu")("a photo of the cat", **kwargs).images
    assert (dynamo - torch_images).abs().max() <= 1e-3
    assert (dynamo - traced).abs().max() <= 1e-3


def test_pixel_unet_parity_at_several_batches_and_the_exporter_in_the_key(classemb_model_dir, tmp_path):
    from diffrt.models import load_pixel_model
    from diffrt.runtime.loading import artifact_pixel_pipeline

    out = tmp_path / "pixel"
    options = ExportOptions(batch=(1, 2, 8), **DYNAMO)
    assert not export_pixel_model(classemb_model_dir, out, options).cache_hit
    model, pipe = load_pixel_model(classemb_model_dir), artifact_pixel_pipeline(out, "onnxruntime")
    for batch in (1, 3, 8):
        feed = pipe.unet.spec.example_feed("opt", batch=batch, seed=batch)
        with torch.no_grad():
            want = model.unet(feed["sample"], feed["timestep"], feed["class_labels"])
        assert compare(want, pipe.unet.run(feed)["noise_pred"]).max_rel <= 1e-4, batch
    assert export_pixel_model(classemb_model_dir, out, options).cache_hit
    traced = export_pixel_model(classemb_model_dir, out, ExportOptions(batch=(1, 2, 8)))  # same folder, other exporter
    assert not traced.cache_hit and traced.manifest["exporter"] == "torchscript" and traced.manifest["opset"] == 17


def test_an_axis_whose_opt_is_1_stays_dynamic(uncond_model_dir, tmp_path):
    """Tracers take a size of 1 for a constant: an opt batch of 1 is traced at 2, so the graph still
    runs every batch of its range (torch.export would otherwise fix the axis to 1 in the ONNX)."""
    from diffrt.runtime.loading import artifact_pixel_pipeline

    out = export_pixel_model(uncond_model_dir, tmp_path / "opt1", ExportOptions(batch=(1, 1, 4), **DYNAMO)).folder
    unet = artifact_pixel_pipeline(out, "onnxruntime").unet
    for batch in (1, 3, 4):
        feed = unet.spec.example_feed("opt", batch=batch)
        assert unet.run(feed)["noise_pred"].shape[0] == batch


def test_trace_sizes_lift_every_size_of_1_inside_the_model_and_keep_linked_axes_together():
    """SD-1.5's UNet halves a latent side three times: exported for 64 px images (latent 8) it would
    be traced with a 1 x 1 deepest level, which torch.export fixes; the trace grows the latent sides
    and the control image's (8x theirs) together, and a batch of 1 to 2."""
    from diffrt.components import unet_controlnet_spec
    from diffrt.export.onnx import trace_sizes

    spec = unet_controlnet_spec(4, 4, 768, num_residuals=13, batch=(1, 1, 4), height=(8, 8, 16), width=(8, 8, 32), multiple=8)
    assert trace_sizes(spec) == {"batch": 2, "height": 16, "width": 16, "image_height": 128, "image_width": 128}
    roomy = unet_controlnet_spec(4, 4, 768, num_residuals=13, batch=(1, 2, 4), height=(8, 64, 96), width=(8, 64, 96), multiple=8)
    assert trace_sizes(roomy) == {}  # the opt point already has no size of 1 inside
    tight = unet_controlnet_spec(4, 4, 768, num_residuals=13, batch=(1, 2, 4), height=(8, 8, 8), width=(8, 8, 8), multiple=8)
    assert trace_sizes(tight) == {}  # a fixed size stays: nothing to grow into


def test_a_graph_with_a_fixed_dynamic_axis_is_refused(classemb_model_dir, tmp_path):
    import onnx

    from diffrt.components import spec_from_dict
    from diffrt.errors import ArtifactError
    from diffrt.export.onnx import check_dynamic_axes

    folder = export_pixel_model(classemb_model_dir, tmp_path / "a", ExportOptions(batch=(1, 2, 8), verify=False)).folder
    spec = spec_from_dict(mf.read_manifest(folder)["components"]["unet"]["spec"])
    model = onnx.load(str(folder / "unet" / "model.onnx"))
    check_dynamic_axes(folder / "unet" / "model.onnx", spec, "torchscript")  # the control: every axis symbolic
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2  # what a tracer that specialised would write
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    with pytest.raises(ArtifactError, match=r"fixed axis 'batch' of noise_pred to 2, which the spec lets range over 1\.\.8"):
        check_dynamic_axes(tmp_path / "fixed.onnx", spec, "dynamo")


def test_lora_refit_weights_are_found_in_a_dynamo_graph(tmp_path):
    """TensorRT takes LoRA by refit from the ONNX's initializers: the weight map must locate every
    LoRA-patchable weight in the dynamo exporter's graph too, and patched initializers compute
    what PyTorch computes with the LoRA fused."""
    import test_tensorrt as trt_tests
    from diffrt.export.lora import read_lora
    from diffrt.export.refit import build_weight_map, refit_weights
    from diffrt.models import build_pixel_model, load_pixel_model, save_pixel_model, small_unet_config

    torch.manual_seed(0)
    model_dir = save_pixel_model(build_pixel_model(small_unet_config(sample_size=8, widths=(8, 16), attention=True),
                                                   conditioning="class_channels", num_classes=3), tmp_path / "model")
    folder = export_pixel_model(model_dir, tmp_path / "onnx", ExportOptions(batch=trt_tests.BATCH, verify=False, **DYNAMO)).folder
    onnx_path = folder / "unet" / "model.onnx"
    wmap = build_weight_map(onnx_path, {"unet": load_pixel_model(model_dir).unet.unet})
    assert wmap["unlocated"] == [] and wmap["ambiguous"] == {}
    lora = trt_tests.make_lora(model_dir, tmp_path / "a.safetensors", 1)
    weights = refit_weights(onnx_path, wmap, [(read_lora(lora), 0.8)])
    assert len(weights.patched) == len(trt_tests.LORA_TARGETS)
    feed = trt_tests.pixel_unet_spec(3, 8, conditioned=True, num_labels=4, batch=trt_tests.BATCH).example_feed("opt", seed=3)
    got = trt_tests._ort_run(trt_tests._onnx_with(folder, weights, tmp_path / "patched"), feed)
    with torch.no_grad():
        want = trt_tests.torch_unet(model_dir, [(lora, 0.8)])(*feed.values())
        base = trt_tests.torch_unet(model_dir)(*feed.values())
    assert (want - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_an_opset_the_dynamo_exporter_cannot_write_is_one_line(uncond_model_dir, tmp_path, capsys):
    with pytest.raises(DiffrtError, match="--exporter dynamo writes opset 18 or newer, not 17"):
        export_pixel_model(uncond_model_dir, tmp_path / "a", ExportOptions(opset=17, **DYNAMO))
    assert main(["export", "--model", str(uncond_model_dir), "--out", str(tmp_path / "b"), "--exporter", "dynamo",
                 "--opset", "17"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--exporter dynamo writes opset 18" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_capture_failure_is_named_by_its_root_cause_on_one_line():
    """torch.onnx wraps torch.export's error (the one that names the problem) in a page of coloured
    advice; the export error shows the cause."""
    from diffrt.export.onnx import _root_cause

    try:
        try:
            raise ValueError("Found the following conflicts:\n- inputs['sample'].shape[2] is static 8")
        except ValueError as inner:
            raise RuntimeError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m ...") from inner
    except RuntimeError as exc:
        assert _root_cause(exc) == "Found the following conflicts: - inputs['sample'].shape[2] is static 8"
