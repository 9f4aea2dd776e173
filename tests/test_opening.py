"""`diffrt.open_pipeline`: the one entry for library users, choosing the pipeline from the model
and the backend from what an artifact was exported for, as `diffrt generate` does."""

from __future__ import annotations

import pytest
import torch

import diffrt
from diffrt.errors import DiffrtError


def test_no_model_opens_the_shipped_digits_model_in_pytorch():
    from diffrt.runtime.pipeline import PixelPipeline

    pipe = diffrt.open_pipeline(device="cpu")
    assert isinstance(pipe, PixelPipeline)
    result = pipe(torch.tensor([3]), num_inference_steps=2, seed=0, output_type="pt")
    assert result.backend == "torch" and result.images.shape == (1, 3, 16, 16)


def test_an_artifact_runs_on_what_it_was_exported_for_and_equals_its_own_opener(t2i_artifact):
    from diffrt.runtime.text_to_image import TextToImagePipeline
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    pipe = diffrt.open_pipeline(t2i_artifact, device="cpu")
    assert isinstance(pipe, TextToImagePipeline)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    kwargs = dict(num_inference_steps=2, seed=5, control_image=control, output_type="pt")
    result = pipe("a red house", **kwargs)
    assert result.backend == "onnxruntime"
    assert torch.equal(result.images, open_text_to_image_pipeline(t2i_artifact, "onnxruntime", "cpu")("a red house", **kwargs).images)


def test_a_controlnet_for_a_pixel_model_is_one_line(uncond_model_dir, t2i_folder):
    with pytest.raises(DiffrtError, match="controlnet needs a text-to-image model") as info:
        diffrt.open_pipeline(uncond_model_dir, controlnet=t2i_folder / "controlnet")
    assert "\n" not in str(info.value)
