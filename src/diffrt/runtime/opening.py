"""One entry for library users: any model diffrt runs, on any backend, as a pipeline.

    import diffrt

    pipe = diffrt.open_pipeline("runs/sd-trt")                      # an artifact: on what it was exported for
    result = pipe("a photo of a cat", num_inference_steps=30, seed=0)
    result.images[0].save("cat.png"); print(result.backend, result.ms_per_step)

The model decides the pipeline: a text-to-image folder or artifact (CLIP + UNet [+ ControlNet]
+ VAE) opens a `TextToImagePipeline`, a pixel-space one (the shipped digits model when None) a
`PixelPipeline`; both take diffusers' argument names. This is what `diffrt generate` and
`diffrt serve` open too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # imported where opened: `import diffrt` stays light
    from diffrt.runtime.pipeline import PixelPipeline
    from diffrt.runtime.text_to_image import TextToImagePipeline


def is_text_to_image(model: str | Path | None) -> bool:
    """Whether `model` (a local folder or artifact) is a latent text-to-image model."""
    from diffrt.export.artifact import is_text_to_image_dir
    from diffrt.export.manifest import read_manifest
    from diffrt.runtime.loading import is_artifact

    if model is None:
        return False
    folder = Path(model)
    if is_artifact(folder):
        return read_manifest(folder).get("kind") == "text-to-image"
    return is_text_to_image_dir(folder)


def open_pipeline(model: str | Path | None = None, backend: str | None = None, device: str | None = None, *,
                  loras: Sequence[tuple[str | Path, float]] = (), controlnet: str | Path | Sequence[str | Path] | None = None,
                  strict: bool = False, cuda_graph: bool = True) -> TextToImagePipeline | PixelPipeline:
    """The pipeline for `model`: a diffusers folder, an artifact from `diffrt export`, a Hub id
    (`org/name[@revision]`), or None for the shipped digits model.

    `backend` None: an artifact runs on what it was exported for (its TensorRT engines where
    TensorRT runs, else ONNX Runtime), a diffusers folder in eager PyTorch. `loras` [(file, scale)];
    `controlnet`: one folder or several (text-to-image only); `strict`: any fallback is an error;
    `cuda_graph`: TensorRT replays each step's launches as a CUDA graph."""
    from diffrt.errors import DiffrtError
    from diffrt.hub import resolve_model
    from diffrt.runtime.loading import default_backend, open_pixel_pipeline
    from diffrt.runtime.lora_scale import check_lora_pairs
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    loras = check_lora_pairs(loras)
    folder = resolve_model(model)  # a Hub id: its snapshot in the Hugging Face cache
    backend = backend or default_backend(folder, strict=strict)
    if is_text_to_image(folder):
        return open_text_to_image_pipeline(folder, backend, device, loras=loras, controlnet=controlnet, strict=strict,
                                           cuda_graph=cuda_graph)
    if controlnet:
        raise DiffrtError("controlnet needs a text-to-image model; this is a pixel-space model")
    return open_pixel_pipeline(folder, backend, device, loras=loras, strict=strict, cuda_graph=cuda_graph)
