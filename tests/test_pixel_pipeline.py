"""The pixel-space pipeline against diffusers' DDIMPipeline, across backends, with guidance."""

from __future__ import annotations

import pytest
import torch

from diffrt.errors import DiffrtError, NonFiniteOutputError, ShapeOutOfRangeError
from diffrt.export.artifact import ExportOptions, export_pixel_model
from diffrt.models import load_pixel_model
from diffrt.runtime.guidance import color_guidance
from diffrt.runtime.loading import artifact_pixel_pipeline, open_pixel_pipeline, torch_pixel_pipeline


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_torch_backend_equals_diffusers_ddim_pipeline(uncond_model_dir, eta):
    from diffusers import DDIMPipeline

    ref = DDIMPipeline.from_pretrained(uncond_model_dir)
    want = ref(batch_size=2, generator=torch.Generator("cpu").manual_seed(7), eta=eta, num_inference_steps=10,
               output_type="np").images
    got = open_pixel_pipeline(uncond_model_dir, "torch")(num_images=2, num_inference_steps=10, eta=eta, seed=7,
                                                         output_type="np").images
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert abs(got - want).max() <= 1e-4


@pytest.fixture(scope="module")
def classemb_artifact(classemb_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "classemb"
    export_pixel_model(classemb_model_dir, out, ExportOptions(batch=(1, 4, 16)))
    return out


def test_onnxruntime_matches_torch_with_cfg(classemb_model_dir, classemb_artifact):
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, seed=3, output_type="pt")
    labels = [0, 1, 2, 3]
    eager = torch_pixel_pipeline(load_pixel_model(classemb_model_dir))(labels, **kwargs)
    ort = artifact_pixel_pipeline(classemb_artifact, "onnxruntime")(labels, **kwargs)
    assert ort.backend == "onnxruntime" and eager.backend == "torch"  # RELIABILITY #15: the backend that ran
    assert (ort.images - eager.images).abs().max().item() <= 1e-3


def test_cfg_changes_the_images(classemb_model_dir):
    pipe = torch_pixel_pipeline(load_pixel_model(classemb_model_dir))
    a = pipe([1, 2], num_inference_steps=5, guidance_scale=1.0, seed=0, output_type="pt").images
    b = pipe([1, 2], num_inference_steps=5, guidance_scale=4.0, seed=0, output_type="pt").images
    assert (a - b).abs().max() > 1e-3


def _mean_colour_distance(images: torch.Tensor, target: torch.Tensor) -> float:
    return (images.mean(dim=(2, 3)) - target).abs().mean().item()


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_colour_guidance_moves_mean_colour_toward_target(classemb_model_dir, classemb_artifact, mode, backend):
    pipe = (torch_pixel_pipeline(load_pixel_model(classemb_model_dir)) if backend == "torch"
            else artifact_pixel_pipeline(classemb_artifact, backend))
    target = torch.tensor([1.0, 0.1, 0.1])
    kwargs = dict(num_inference_steps=8, guidance_scale=2.0, seed=1, output_type="pt")
    plain = pipe([0, 1, 2, 3], **kwargs).images
    guided = pipe([0, 1, 2, 3], guidance=[color_guidance("#ff1a1a", 20.0, mode=mode)], **kwargs).images
    before, after = _mean_colour_distance(plain, target), _mean_colour_distance(guided, target)
    assert after < before - 0.05, (before, after)


def test_bad_requests_get_one_clear_error(classemb_model_dir, classemb_artifact):
    pipe = artifact_pixel_pipeline(classemb_artifact, "onnxruntime")
    with pytest.raises(DiffrtError, match=r"class label 9 is out of range; this model has classes 0\.\.3"):
        pipe([9], num_inference_steps=2)
    with pytest.raises(ShapeOutOfRangeError, match=r"classifier-free guidance.*\[1, 16\]"):
        pipe(list(range(4)) * 3, guidance_scale=2.0, num_inference_steps=2)
    with pytest.raises(ShapeOutOfRangeError, match=r"height 32 is outside the built range \[16, 16\]"):
        pipe([1], height=32, width=32, num_inference_steps=2)
    with pytest.raises(DiffrtError, match="eta"):
        pipe([1], eta=2.0, num_inference_steps=2)
    with pytest.raises(DiffrtError, match="class-conditioned"):
        pipe(None, num_inference_steps=2)


def test_nan_in_a_component_is_reported_with_its_name(classemb_model_dir):
    model = load_pixel_model(classemb_model_dir)
    pipe = torch_pixel_pipeline(model)
    # Poison one weight: every prediction becomes NaN, as an fp16 overflow would.
    with torch.no_grad():
        model.unet.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="unet produced"):
        pipe([0], num_inference_steps=2)


@pytest.mark.parametrize("fixture", ["classchan_model_dir", "uncond_model_dir"])
def test_other_variants_export_and_match(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "art"
    result = export_pixel_model(folder, out, ExportOptions(batch=(1, 2, 8)))
    assert result.manifest["components"]["unet"]["parity"]["onnxruntime"]["passed"]
    model = load_pixel_model(folder)
    labels = [0, 3] if model.info.conditioning != "none" else None
    kwargs = dict(num_images=None if labels else 2, num_inference_steps=5, guidance_scale=2.0, seed=2, output_type="pt")
    eager = torch_pixel_pipeline(model)(labels, **kwargs).images
    ort = artifact_pixel_pipeline(out, "onnxruntime")(labels, **kwargs).images
    assert (ort - eager).abs().max().item() <= 1e-3
