"""Changing the strength of a running pipeline's LoRA (`set_lora_scale`, diffusers' `lora_scale`).

diffusers is the oracle: `load_lora_weights` then `cross_attention_kwargs={"scale": s}` (unfused
adapters at s times their weight). Within diffrt, scale s must give bit for bit what opening the
pipeline with the LoRA at s times its scale gives, and going back and forth never accumulates.
The TensorRT refit path (EngineLora) needs a GPU and TensorRT: tests/test_tensorrt.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffrt.errors import DiffrtError
from diffrt.generate import DEFAULT_PIXEL_GUIDANCE_SCALE
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

CPU = "cpu"
STEPS = 3


@pytest.fixture(scope="module")
def lora(t2i_folder, tmp_path_factory):
    from diffrt.tiny import tiny_lora_files

    return tiny_lora_files(t2i_folder, tmp_path_factory.mktemp("lora"), seed=11)["peft"]


@pytest.fixture(scope="module")
def lora_pipe(t2i_folder, lora):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.8)])


def run(pipe, seed=3, **kwargs):
    return pipe("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, seed=seed, output_type="pt", **kwargs).images


def weights(pipe) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet.module, "text_encoder": pipe.text_encoder.module}
    return {f"{c}.{k}": v.clone() for c, m in modules.items() for k, v in m.state_dict().items()}


def test_scale_equals_opening_at_that_scale(t2i_folder, lora, lora_pipe):
    opened = run(lora_pipe)
    lora_pipe.set_lora_scale(0.5)
    try:
        assert lora_pipe.lora_scale == 0.5
        at_half = run(lora_pipe)
        assert torch.equal(at_half, run(open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.4)])))
        assert (at_half - opened).abs().max() > 1e-3  # the LoRA's strength shows in the images
        lora_pipe.set_lora_scale(0.0)
        assert torch.equal(run(lora_pipe), run(open_text_to_image_pipeline(t2i_folder, "torch", CPU)))  # 0: the base model
    finally:
        lora_pipe.set_lora_scale(1.0)
    assert torch.equal(run(lora_pipe), opened)


def test_scale_changes_never_accumulate(lora_pipe):
    before = weights(lora_pipe)
    for scale in (0.3, 2.0, 0.0, 1.0):
        lora_pipe.set_lora_scale(scale)
    after = weights(lora_pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_scale_equals_diffusers_lora_scale(t2i_folder, lora, lora_pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(t2i_folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora, adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[0.8])
    expected = ref("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(3), cross_attention_kwargs={"scale": 0.5}).images
    lora_pipe.set_lora_scale(0.5)
    try:
        assert (run(lora_pipe) - expected).abs().max() <= 1e-4
    finally:
        lora_pipe.set_lora_scale(1.0)


def test_refused_where_the_weights_cannot_change(t2i_folder, lora, tmp_path):
    plain = open_text_to_image_pipeline(t2i_folder, "torch", CPU)
    plain.set_lora_scale(1.0)  # the scale it runs at: always accepted
    with pytest.raises(DiffrtError, match=r"lora_scale 0.5: this model runs no LoRA; open it with --lora"):
        plain.set_lora_scale(0.5)

    from diffrt.export.artifact import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    out = tmp_path / "baked"
    export_text_to_image(t2i_folder, out, ExportOptions(loras=[(str(lora), 0.8)], verify=False), [])
    baked = open_text_to_image_pipeline(out, "onnxruntime", CPU)
    assert baked.runtime_metadata()["lora_scale"] == 1.0
    baked.set_lora_scale(1.0)
    with pytest.raises(DiffrtError, match=r"lora_scale 2: .*baked into its onnxruntime graphs at export"):
        baked.check_lora_scale(2.0)
    with pytest.raises(DiffrtError, match="lora_scale must be a finite number >= 0"):
        open_text_to_image_pipeline(out, "torch", CPU).set_lora_scale(-1.0)


def test_pixel_artifact_on_torch_scales_its_lora(classemb_model_dir, tmp_path):
    """A pixel artifact's LoRA, run by its PyTorch source, takes a new strength like a text-to-image one."""
    from test_tensorrt import make_lora

    from diffrt.export.artifact import ExportOptions, export_pixel_model
    from diffrt.runtime.loading import open_pixel_pipeline

    lora = make_lora(classemb_model_dir, tmp_path / "pixel_lora.safetensors", seed=2)
    half, full = tmp_path / "half", tmp_path / "full"
    for out, scale in ((half, 0.25), (full, 0.5)):
        export_pixel_model(classemb_model_dir, out, ExportOptions(batch=(1, 2, 8), loras=[(str(lora), scale)], verify=False))
    pipe = open_pixel_pipeline(full, "torch", CPU)

    def sample(p):
        return p([1, 3], num_inference_steps=STEPS, guidance_scale=3.0, seed=1, output_type="pt").images

    at_full = sample(pipe)
    pipe.set_lora_scale(0.5)
    assert torch.equal(sample(pipe), sample(open_pixel_pipeline(half, "torch", CPU)))
    assert not torch.equal(sample(pipe), at_full)
    with pytest.raises(DiffrtError, match="baked into its onnxruntime graphs"):
        open_pixel_pipeline(full, "onnxruntime", CPU).set_lora_scale(0.5)


def test_generate_takes_lora_for_pixel_models(classemb_model_dir, tmp_path):
    """`diffrt generate --lora` on a pixel model fuses it (torch) or exports with it baked in
    (onnxruntime), as for text-to-image models; an artifact keeps the LoRA it was exported with."""
    from test_tensorrt import make_lora

    from diffrt.errors import ArtifactError
    from diffrt.export.artifact import ExportOptions, export_pixel_model
    from diffrt.generate import GenerateRequest, generate
    from diffrt.runtime.loading import open_pixel_pipeline

    lora = make_lora(classemb_model_dir, tmp_path / "pixel_lora.safetensors", seed=4)
    artifact = tmp_path / "artifact"
    export_pixel_model(classemb_model_dir, artifact, ExportOptions(batch=(1, 2, 8), loras=[(str(lora), 0.7)], verify=False))
    request = GenerateRequest(model=str(classemb_model_dir), class_label=2, num_images=2, num_inference_steps=STEPS, seed=5)
    fused = generate(replace(request, loras=[(str(lora), 0.7)])).images
    assert not torch.equal(fused, generate(request).images)
    assert torch.equal(generate(replace(request, loras=[(str(lora), 1.4)], lora_scale=0.5)).images, fused)  # --lora-scale
    expected = open_pixel_pipeline(artifact, "torch", CPU)([2, 2], num_inference_steps=STEPS, guidance_scale=DEFAULT_PIXEL_GUIDANCE_SCALE,
                                                           seed=5, output_type="pt").images
    assert torch.equal(fused, expected)
    with pytest.raises(ArtifactError, match=r"has LoRA baked in at export \(pixel_lora.safetensors:0.7\)"):
        generate(replace(request, model=str(artifact), backend="onnxruntime", loras=[(str(lora), 0.3)]))



def test_metadata_says_whether_the_lora_scale_can_change(t2i_folder, lora, tmp_path):
    """What the demo reads to show its LoRA slider: PyTorch can change the strength, a LoRA baked into ONNX cannot."""
    from diffrt.export.artifact import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    meta = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.8)]).runtime_metadata()
    assert (meta["lora_scale"], meta["lora_scalable"]) == (1.0, True)
    export_text_to_image(t2i_folder, tmp_path / "baked", ExportOptions(loras=[(str(lora), 0.8)], verify=False), [])
    assert open_text_to_image_pipeline(tmp_path / "baked", "onnxruntime", CPU).runtime_metadata()["lora_scalable"] is False
    assert "lora_scale" not in open_text_to_image_pipeline(t2i_folder, "torch", CPU).runtime_metadata()
