"""optimum's ONNX Runtime Stable Diffusion pipeline: the alternative a user would try first.

Measured end to end only (its components are not diffrt Backends). It exports the same
diffusers folder with optimum's own exporter (fp16 through `main_export(dtype="fp16")` on
CUDA), cached beside the benchmark's models, and samples with diffusers' DDIMScheduler and the
same seed, so its images can be compared with eager PyTorch's.
"""

from __future__ import annotations

import torch

from diffrt.bench.configs import NotApplicable, Workload, cache_root


def _import_reason(exc: Exception) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = None
    why = f"optimum.onnxruntime does not import here ({type(exc).__name__}: {exc})"
    if transformers and int(transformers.split(".")[0]) >= 5:
        why += (f"; optimum-onnx, which holds the ORT diffusion pipelines, supports transformers<4.58 and this "
                f"environment has transformers {transformers}, which diffrt's text-to-image stack uses")
    return why


def open_optimum(config, device: torch.device) -> Workload:
    """Raises NotApplicable, naming every reason, where optimum cannot run this configuration."""
    reasons = []
    if config.controlnet:
        reasons.append("optimum has no ONNX Runtime ControlNet pipeline (its ORT diffusion pipelines are Stable Diffusion "
                       "txt2img/img2img/inpaint, SDXL and LCM)")
    if config.colour_guidance:
        reasons.append("optimum's pipelines have no gradient guidance")
    try:
        from optimum.onnxruntime import ORTStableDiffusionPipeline
    except Exception as exc:  # missing, or present but broken against this transformers
        reasons.append(_import_reason(exc))
    if reasons:
        raise NotApplicable("; ".join(reasons))
    from diffusers import DDIMScheduler

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    out = cache_root() / f"optimum-{config.folder.name}-{config.precision}"
    if not (out / "model_index.json").is_file():
        from optimum.exporters.onnx import main_export

        main_export(str(config.folder), output=str(out), task="text-to-image", device=device.type,
                    dtype="fp16" if config.precision == "fp16" else "fp32")
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(out), provider=provider)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def run(steps: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(config.seed)
        result = pipe(config.prompt, negative_prompt="", height=config.size, width=config.size, num_inference_steps=steps,
                      guidance_scale=config.guidance_scale, num_images_per_prompt=config.num_images, generator=generator,
                      output_type="np")
        return torch.from_numpy(result.images).permute(0, 3, 1, 2).float()

    return Workload(pipe, run, (), {"providers": [provider], "export": str(out)})
