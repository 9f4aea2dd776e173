"""optimum's ONNX Runtime Stable Diffusion pipeline: the alternative a user would try first.

Measured end to end only (its components are not diffrt Backends). It exports the same
diffusers folder with optimum's own exporter (fp16 through `main_export(dtype="fp16")` on
CUDA), cached beside the benchmark's models, and samples with the configuration's sampler as
diffusers' scheduler class (DDIM unless the configuration names another), the same seed and the
benchmark's thread count for ONNX Runtime's intra-op pool, so its images and times can be
compared with eager PyTorch's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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


# diffrt's `scheduler=` names -> the diffusers class diffrt's sampler reproduces (runtime/sampling.py)
DIFFUSERS_SCHEDULERS = {None: "DDIMScheduler", "ddim": "DDIMScheduler", "lcm": "LCMScheduler", "dpm": "DPMSolverMultistepScheduler",
                        "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}


def diffusers_scheduler(name: str | None, scheduler_config):
    """The configuration's sampler as diffusers' scheduler on the folder's training schedule."""
    import diffusers

    if name not in DIFFUSERS_SCHEDULERS:
        raise NotApplicable(f"no diffusers scheduler for scheduler={name!r}; known: {', '.join(map(str, DIFFUSERS_SCHEDULERS))}")
    return getattr(diffusers, DIFFUSERS_SCHEDULERS[name]).from_config(scheduler_config)


def session_options():
    """ONNX Runtime options with the intra-op pool the benchmark measures every backend with
    (torch's thread count, which `cpu_threads` sets), not ONNX Runtime's default of every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return options


def export_once(out: Path, export) -> None:
    """Run `export(folder)` unless `out` holds a finished export: it writes a staging folder beside `out`, renamed
    into place once whole, so a benchmark killed mid-export leaves nothing the next run would take for an export,
    whatever order optimum writes its files in."""
    if (out / "model_index.json").is_file():
        return
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


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
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    out = cache_root() / f"optimum-{config.folder.name}-{config.precision}"

    def export(staging: Path) -> None:
        from optimum.exporters.onnx import main_export

        main_export(str(config.folder), output=str(staging), task="text-to-image", device=device.type,
                    dtype="fp16" if config.precision == "fp16" else "fp32")

    export_once(out, export)
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(out), provider=provider, session_options=session_options())
    pipe.scheduler = diffusers_scheduler(config.scheduler, pipe.scheduler.config)

    def run(steps: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(config.seed)
        result = pipe(config.prompt, negative_prompt="", height=config.size, width=config.size, num_inference_steps=steps,
                      guidance_scale=config.guidance_scale, num_images_per_prompt=config.num_images, generator=generator,
                      output_type="np")
        return torch.from_numpy(result.images).permute(0, 3, 1, 2).float()

    return Workload(pipe, run, (), {"providers": [provider], "export": str(out), "scheduler": type(pipe.scheduler).__name__,
                                    "intra_op_num_threads": torch.get_num_threads()})
