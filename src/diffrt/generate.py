"""`diffrt generate`: one request, from arguments to an image file.

Pixel-space models (the shipped digits, `train class-cond`/`finetune` outputs) and latent
text-to-image pipelines share this entry; the model folder decides which pipeline runs.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffrt import atomic
from diffrt.errors import DiffrtError, ShapeOutOfRangeError
from diffrt.images import load_image, png_bytes, save_grid, to_numpy
from diffrt.runtime.guidance import Guidance, color_guidance
from diffrt.runtime.opening import is_text_to_image
from diffrt.runtime.text_to_image_inputs import DEFAULT_STRENGTH

log = logging.getLogger(__name__)

# Classifier-free guidance scale for class-conditioned pixel models when none is given; chosen on
# the shipped digits model (benchmarks/bench_quality.py), as the demo's DemoSettings.
DEFAULT_PIXEL_GUIDANCE_SCALE = 2.0


@dataclass
class GenerateRequest:
    model: str | None = None
    backend: str | None = None  # None: the fastest exported backend for an artifact, else torch
    seed: int = 0
    num_inference_steps: int = 25
    out: str = "out.png"
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0  # text-to-image: diffusers' guidance_rescale
    height: int | None = None
    width: int | None = None
    num_images: int | None = None
    eta: float = 0.0
    scheduler: str | None = None  # "ddim", "lcm", "dpm", "euler" or "euler_a"; None: the model's own (the sampler its scheduler config names)
    class_label: int | str | None = None  # a label, or the name the model gives its class
    controlnet: str | list[str] | None = None  # one ControlNet folder, or several (diffusers' MultiControlNetModel), in order
    control_image: str | list[str] | None = None  # one conditioning image file per ControlNet, in the same order
    control_scale: float | list[float] | None = None  # one for every ControlNet, or one per ControlNet; None: diffusers' default (0.8 with --image, else 1.0)
    control_guidance_start: float | list[float] | None = None  # fraction of the steps each ControlNet starts at; None: 0
    clip_skip: int | None = None  # text-to-image: diffusers' clip_skip (None: 0, the text encoder's last hidden state)
    control_guidance_end: float | list[float] | None = None  # ... and stops at; None: 1
    guess_mode: bool = False  # diffusers' ControlNet guess_mode
    image: str | None = None  # img2img: the image file to start from (text-to-image models)
    strength: float | None = None  # img2img: how much of the schedule runs (1.0: the image is all noise); None: 0.8
    loras: list[tuple[str, float]] = field(default_factory=list)
    lora_scale: float = 1.0  # times the LoRA scales (--lora, or an artifact's); a refit for TensorRT engines
    color: str | None = None
    color_scale: float = 3.0
    clip_prompt: str | None = None
    clip_model: str | None = None
    clip_scale: float = 10.0
    guidance_mode: str = "x0"
    device: str | None = None  # None: cuda when available (tensorrt needs it), else cpu
    strict: bool = False  # any fallback (ONNX Runtime provider, PyTorch for an artifact) is an error
    cuda_graph: bool = True  # tensorrt: replay each step's launch as a CUDA graph (shapes are fixed within a run)
    progress: bool = False  # a tqdm bar over the denoising steps (the CLI's), as diffusers' pipelines show


def resolve_hub_ids(req: GenerateRequest) -> GenerateRequest:
    """The request with any Hub id (model, ControlNets, CLIP model) replaced by its cached snapshot folder (hub.py)."""
    from diffrt.hub import resolve_model

    def one(path):
        return None if path is None else str(resolve_model(path))

    controlnet = [one(c) for c in req.controlnet] if isinstance(req.controlnet, (list, tuple)) else one(req.controlnet)
    return replace(req, model=one(req.model), controlnet=controlnet, clip_model=one(req.clip_model))


def build_guidance(req: GenerateRequest) -> list[Guidance]:
    """The request's guidance terms. A flag that would do nothing is refused, not ignored: unguided images with no
    word of why (an empty --color or --clip-prompt reaches their own refusals)."""
    guidance = []
    if req.color is not None:
        guidance.append(color_guidance(req.color, req.color_scale, mode=req.guidance_mode))
    if req.clip_prompt is not None:
        if not req.clip_model:
            raise DiffrtError("--clip-prompt needs --clip-model DIR (a local CLIPModel folder; nothing is downloaded)")
        from diffrt.runtime.clip_guidance import clip_guidance

        guidance.append(clip_guidance(req.clip_model, req.clip_prompt, req.clip_scale, mode=req.guidance_mode, device=req.device))
    elif req.clip_model:
        raise DiffrtError(f"--clip-model {req.clip_model} is the model CLIP guidance scores with; give --clip-prompt TEXT to "
                          "guide toward, or leave --clip-model out")
    if not guidance and req.guidance_mode != "x0":
        raise DiffrtError(f"--guidance-mode {req.guidance_mode} sets how gradient guidance runs, and none is asked; give "
                          "--color HEX or --clip-prompt TEXT, or leave --guidance-mode out")
    return guidance


def generate(req: GenerateRequest):
    """Run the request; returns the GenerationResult with images as a [N, C, H, W] tensor in [0, 1]."""
    from diffrt.runtime.backends import require_backend, resolve_device

    if req.num_images is not None and req.num_images < 1:
        raise DiffrtError(f"--num-images must be >= 1, got {req.num_images}")
    if req.image:  # before the model loads (its progress bars came above the error line)
        from diffrt.runtime.text_to_image_inputs import check_strength

        if not Path(req.image).is_file():
            raise DiffrtError(f"--image {req.image} is a folder; pass an image file" if Path(req.image).is_dir() else
                              f"--image {req.image}: no such file; give the image to start from")
        check_strength(image_strength(req), req.num_inference_steps)
    if req.strength is not None and not req.image:  # text-to-image would run, ignoring it (`diffrt serve` refuses it too)
        raise DiffrtError(f"--strength {req.strength} sets how much of an --image is redrawn (image-to-image); pass --image FILE "
                          "to start from, or leave --strength out")
    req = resolve_hub_ids(req)
    if req.backend is None:  # an artifact runs its exported files; a diffusers folder runs in PyTorch
        from diffrt.runtime.loading import default_backend

        req = replace(req, backend=default_backend(req.model, strict=req.strict))
    require_backend(req.backend)
    req = replace(req, device=str(resolve_device(req.device, req.backend)))  # before any export or model load
    guidance = build_guidance(req)
    with step_bar(req) as progress:
        try:
            result = _generate(req, guidance, progress)
        except ShapeOutOfRangeError as exc:
            raise _exported_for_you(req, exc) from None
    if "lora_scale" in result.metadata:  # --lora-scale, whether set after opening or folded into --lora (opened_loras)
        result.metadata["lora_scale"] = req.lora_scale
    return result


def _exported_for_you(req: GenerateRequest, exc: ShapeOutOfRangeError) -> ShapeOutOfRangeError:
    """A size outside an export that generate made itself (a model folder on an exported backend) covers the
    model's own size only, and "re-export with a wider --height range" named a flag generate does not take:
    say how to make such an export."""
    from diffrt.runtime.backends import TORCH_BACKENDS
    from diffrt.runtime.loading import is_artifact

    problem, advice, _ = str(exc).partition("; re-export")
    if not advice or req.backend in TORCH_BACKENDS or (req.model is not None and is_artifact(Path(req.model))):
        return exc
    model = f" --model {shlex.quote(req.model)}" if req.model is not None else ""  # export's default is the shipped model too
    sides = "--height MIN:OPT:MAX --width MIN:OPT:MAX" if is_text_to_image(req.model) else "--height MIN:OPT:MAX"  # pixel: square
    return ShapeOutOfRangeError(f"{problem}, that of the {req.backend} export made for this call (the model's own size); "
                                f"export a range with `diffrt export{model} {sides} --out DIR` and generate with --model DIR, "
                                "or use --backend torch")


def image_strength(req: GenerateRequest) -> float:
    """Image-to-image's strength: the request's, or diffusers' default."""
    return DEFAULT_STRENGTH if req.strength is None else req.strength


def opened_loras(req: GenerateRequest) -> tuple[list, float]:
    """(LoRAs to open, strength to set after). A source folder's --lora files open at --lora-scale times their scales,
    and 1.0 after: a one-shot run opens its LoRA at the strength it runs (bit for bit what a change of strength gives,
    lora_scale.TorchLora), so an export bakes it in at that strength (opened at 1.0 and set after, an ONNX export ran
    first and its graph's fixed LoRA then refused the strength). An artifact's --lora names the LoRA it was exported
    with, as exported: its strength is set after opening, as it is without --lora. The result's metadata reports
    --lora-scale either way."""
    from diffrt.runtime.loading import is_artifact
    from diffrt.runtime.lora_scale import check_scale_value, scaled

    if not req.loras or req.lora_scale == 1.0 or (req.model is not None and is_artifact(Path(req.model))):
        return req.loras, req.lora_scale
    check_scale_value(req.lora_scale)
    return scaled(req.loras, req.lora_scale), 1.0


@contextlib.contextmanager
def step_bar(req: GenerateRequest):
    """A per-step progress hook drawing a tqdm bar when the request asks for one, else None. The
    bar opens at the first step, after any export or model load (which show their own progress).
    Image-to-image runs the last `strength` of the schedule, as diffusers counts it."""
    if not req.progress:
        yield None
        return
    steps = req.num_inference_steps
    total = min(int(steps * image_strength(req)), steps) if req.image else steps
    bars = []

    def step_done(_step: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="generate", unit="step", leave=False))
        bars[0].update(1)

    try:
        yield step_done
    finally:
        for bar in bars:
            bar.close()


def _generate(req: GenerateRequest, guidance: list[Guidance], progress):
    if is_text_to_image(req.model):
        return _generate_text_to_image(req, guidance, progress)
    text_only = {"--prompt": req.prompt, "--negative-prompt": req.negative_prompt, "--controlnet": req.controlnet,
                 "--guidance-rescale": req.guidance_rescale != 0,
                 "--control-image": req.control_image, "--image": req.image,
                 "--control-scale": req.control_scale not in (None, []),
                 "--control-guidance-start": req.control_guidance_start not in (None, []),
                 "--control-guidance-end": req.control_guidance_end not in (None, []), "--clip-skip": req.clip_skip is not None,
                 "--guess-mode": req.guess_mode}
    given = [flag for flag, value in text_only.items() if value]
    if given:
        from diffrt.models import require_pixel_model_dir
        from diffrt.runtime.loading import is_artifact

        if req.model is not None and not is_artifact(Path(req.model)):
            require_pixel_model_dir(req.model)  # a mistyped path is "not found", not "a pixel-space model"
        verb = "needs" if len(given) == 1 else "need"
        raise DiffrtError(f"{'/'.join(given)} {verb} a text-to-image model folder; this is a pixel-space model (use --class-label)")
    from diffrt.runtime.loading import open_pixel_pipeline

    loras, lora_scale = opened_loras(req)
    pipe = open_pixel_pipeline(req.model, req.backend, req.device, loras=loras, strict=req.strict, cuda_graph=req.cuda_graph)
    pipe.set_lora_scale(lora_scale)
    labels = None
    if pipe.info.conditioning != "none":
        if req.class_label is None and req.num_images:  # else one image per class, and --num-images would go unused
            raise DiffrtError(f"--num-images {req.num_images} on a class-conditioned model needs --class-label; without one, "
                              f"generate makes one image per class ({pipe.info.num_classes})")
        label = class_index(req.class_label, pipe.info.class_names)
        labels = torch.arange(pipe.info.num_classes) if label is None else torch.tensor([label])
        if req.class_label is not None and req.num_images:
            labels = labels.expand(req.num_images)
    else:  # nothing would read them: random samples with no word of why
        unread = [flag for flag, given in (("--class-label", req.class_label is not None),
                                           ("--guidance-scale", req.guidance_scale not in (None, 1))) if given]
        if unread:
            raise DiffrtError(f"{'/'.join(unread)} {'needs' if len(unread) == 1 else 'need'} a class-conditioned model (classifier-"
                              f"free guidance steers by the label); this one is unconditional: leave {'/'.join(unread)} out")
    scale = DEFAULT_PIXEL_GUIDANCE_SCALE if req.guidance_scale is None else req.guidance_scale
    if labels is not None and scale != 1 and pipe.info.training.get("label_dropout") == 0:
        log.warning("this model's last training ran with --label-dropout 0, so no step of it trained the null class "
                    "(classifier-free guidance's unconditional branch): guidance scale %g steers by a prediction that "
                    "run never shaped; pass --guidance-scale 1", scale)
    return pipe(labels, num_images=req.num_images if labels is None else None, num_inference_steps=req.num_inference_steps,
                guidance_scale=scale, eta=req.eta, seed=req.seed, guidance=guidance, height=req.height, width=req.width,
                output_type="pt", progress=progress, scheduler=req.scheduler)


def class_index(label: int | str | None, names: list[str]) -> int | None:
    """A class label as `generate --class-label` takes it: a class's name (its class folder's), else a number. Where
    the model's classes are named by numbers (folders 1, 2, 10, or 01, 02), a number is the class of that value;
    otherwise it is the label itself, as the Python API and `diffrt serve` take it."""
    if label is None:
        return None
    text = str(label)
    if text in names:
        return names.index(text)
    numbered = bool(names) and all(n.isdecimal() for n in names)
    if text.lstrip("+-").isdecimal():
        if not numbered:
            return int(text)
        values = [int(n) for n in names]
        if int(text) in values:
            return values.index(int(text))
    known = f"its classes are {', '.join(names)}" if names else "it names no classes"
    raise DiffrtError(f"--class-label {text!r} is not a class of this model ({known}); pass a class's name or number")


def _generate_text_to_image(req: GenerateRequest, guidance: list[Guidance], progress):
    """A text-to-image folder or artifact's images as a [N, C, H, W] tensor in [0, 1]."""
    from diffrt.runtime.text_to_image import default_guidance_scale
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    if req.class_label is not None:
        raise DiffrtError("--class-label is for class-conditioned pixel models; this is a text-to-image model (use --prompt)")
    controlnets, images, scales = _listed(req.controlnet), _listed(req.control_image), _listed(req.control_scale) or [None]
    if controlnets and not images:
        raise DiffrtError("--controlnet DIR needs --control-image FILE, the conditioning image (one per --controlnet, in the same order)")
    if controlnets and len(images) != len(controlnets):
        raise DiffrtError(f"got {len(controlnets)} --controlnet but {len(images)} --control-image; "
                          "give one --control-image per --controlnet, in the same order")
    if images and len(scales) not in (1, len(images)):
        raise DiffrtError(f"got {len(scales)} --control-scale for {len(images)} --control-image; "
                          "give one for every ControlNet, or one per --control-image")
    loras, lora_scale = opened_loras(req)
    pipe = open_text_to_image_pipeline(req.model, req.backend, req.device, loras=loras, controlnet=controlnets or None,
                                       strict=req.strict, cuda_graph=req.cuda_graph)
    pipe.set_lora_scale(lora_scale)
    control = None
    if images:
        k = pipe.num_controlnets
        if pipe.has_controlnet and len(images) != k:  # an artifact carries its ControlNets: count them here
            raise DiffrtError(f"{req.model} runs {k} ControlNet{'s' if k != 1 else ''}; give one --control-image per ControlNet "
                              f"({k}, in the order they were exported), got {len(images)}")
    # Files are resized as diffusers resizes PIL images: to --height/--width, a side not given rounded down to the VAE's factor.
    size, f = (req.height, req.width), pipe.vae_factor
    if images:
        control = [load_image(path, size=size, multiple=f) for path in images]  # one per ControlNet, as the pipeline takes them
    init = load_image(req.image, size=size, multiple=f) if req.image else None
    scheduler = req.scheduler
    default_scale = default_guidance_scale(pipe, pipe.sampler_config(scheduler))
    return pipe(req.prompt or "", image=init, strength=req.strength, negative_prompt=req.negative_prompt, height=req.height, width=req.width,
                num_inference_steps=req.num_inference_steps, scheduler=scheduler,
                guidance_scale=default_scale if req.guidance_scale is None else req.guidance_scale,
                guidance_rescale=req.guidance_rescale, num_images_per_prompt=req.num_images or 1, eta=req.eta, seed=req.seed, control_image=control,
                controlnet_conditioning_scale=_one_or_list(req.control_scale, None), guidance=guidance, output_type="pt",
                control_guidance_start=_one_or_list(req.control_guidance_start, 0.0),
                control_guidance_end=_one_or_list(req.control_guidance_end, 1.0), guess_mode=req.guess_mode, clip_skip=req.clip_skip,
                progress=progress)


def _one_or_list(value, default: float | None):
    """A repeatable flag as the pipeline takes it: the default when not given, one number, or one per ControlNet."""
    values = _listed(value)
    return default if not values else values[0] if len(values) == 1 else values


def _listed(value) -> list:
    """A request field that takes one value or a list (repeatable flags) -> a list; None -> []."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def generate_to_file(req: GenerateRequest):
    """Generate and write a PNG (one image as it is; several as a grid) or a .npy array (float32,
    N x H x W x C in [0, 1])."""
    out = Path(req.out)
    if out.suffix.lower() not in (".png", ".npy"):
        raise DiffrtError(f"--out {out} must end in .png (a grid) or .npy (float32 N x H x W x C)")
    atomic.check_writable(out)  # before the sampling, not after
    result = generate(req)
    images = result.images
    if out.suffix.lower() == ".npy":
        with atomic.atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, to_numpy(images))
    elif images.shape[0] == 1:
        atomic.write_bytes(out, png_bytes(images[0]))
    else:
        nrow = int(np.ceil(np.sqrt(images.shape[0]))) if images.shape[0] > 10 or images.shape[0] < 4 else images.shape[0]
        save_grid(out, images, nrow=nrow, scale=max(1, 64 // images.shape[-1]))
    return result, out


def result_summary(result, path: Path) -> str:
    """`diffrt generate`'s output line: the file, what really ran it (RELIABILITY #15) and its speed."""
    meta = result.metadata
    ran = result.backend
    providers = sorted({p for used in meta.get("providers", {}).values() for p in used[:1]})
    if providers:
        ran += f" on {', '.join(providers)}"
    if meta.get("cuda_graph"):
        ran += " with CUDA graphs"
    if not result.backend.startswith("torch"):
        if meta.get("guidance_pytorch"):  # engines have no autograd
            ran += f"; guidance ran the {' and '.join(meta['guidance_pytorch'])} in PyTorch"
        if str(meta.get("components", {}).get("vae_encoder", "")).startswith("torch"):
            ran += "; the vae_encoder ran in PyTorch (an artifact exported without --vae-encoder)"
    cut = " (prompt truncated)" if result_warnings(result) else ""
    compiled = ", the first run's compilation included" if result.backend == "torch-compile" else ""
    return f"wrote {path} ({ran}, {result.ms_per_step:.1f} ms/step{compiled}){cut}"


def result_warnings(result) -> list[str]:
    """What the user should know about a result: prompt text the text encoder cut off (RELIABILITY #13)."""
    meta, warnings = result.metadata, []
    for key, what in (("truncated", "prompt"), ("truncated_negative", "negative prompt")):
        for dropped in meta.get(key) or []:
            if dropped is not None:
                warnings.append(f"the {what} is longer than the text encoder's {meta.get('max_length')} tokens "
                                f"and was truncated; dropped: {dropped!r}")
    return warnings
