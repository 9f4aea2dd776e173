"""What the pixel-space trainers (class-cond, finetune) share: the loss of one micro-batch and
the sample grid, both over a `PixelModel` and an in-memory `ImageDataset`."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from diffrt.data import ImageDataset
from diffrt.errors import DiffrtError
from diffrt.models import PixelModel, save_pixel_model
from diffrt.runtime.ddim import make_alphas_cumprod
from diffrt.train.config import TrainConfig, images_per_step, peak_learning_rate
from diffrt.train.loop import LossFn, SampleFn
from diffrt.train.objective import diffusion_loss

log = logging.getLogger(__name__)


def pixel_loss_fn(model: PixelModel, dataset: ImageDataset, batch_size: int, label_dropout: float,
                  snr_gamma: float | None = None, noise_offset: float = 0.0) -> LossFn:
    """DDPM loss on a batch drawn from the step's generator; labels are dropped to the null label
    with probability `label_dropout` (classifier-free guidance training) for conditioned models."""
    unet, null = model.unet, model.info.null_class_label
    alphas_cumprod = make_alphas_cumprod(model.scheduler)
    n = len(dataset)
    objective = {"prediction_type": model.scheduler.prediction_type, "snr_gamma": snr_gamma, "noise_offset": noise_offset}

    def loss_fn(micro: int, g: torch.Generator) -> torch.Tensor:
        device = next(unet.parameters()).device
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x0, labels = dataset.batch(idx, g)
        if null is None:
            return diffusion_loss(lambda x_t, t: unet(x_t, t), x0.to(device), alphas_cumprod, g, **objective)
        drop = torch.rand(batch_size, generator=g) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null), labels).to(device)
        return diffusion_loss(lambda x_t, t: unet(x_t, t, labels), x0.to(device), alphas_cumprod, g, **objective)

    return loss_fn


def grid_guidance_scale(model: PixelModel, label_dropout: float, guidance_scale: float) -> float:
    """The guidance scale of the sample grids. With --label-dropout 0 no step trains the null class, the unconditional
    branch of classifier-free guidance, so guiding away from it steers by a prediction that the run never shaped:
    the grids are drawn without guidance then, and the run says so once."""
    if model.info.null_class_label is None or label_dropout > 0 or guidance_scale == 1:
        return guidance_scale
    log.warning("--label-dropout 0 trains no step on the null class that classifier-free guidance takes its unconditional "
                "prediction from: sample grids are drawn without guidance (scale 1); generate with --guidance-scale 1, or "
                "train with --label-dropout 0.1")
    return 1.0


def pixel_sample_fn(model: PixelModel, steps: int, guidance_scale: float, per_class: int = 8, num_images: int = 16) -> SampleFn:
    """A grid with the model as it trains: one row of `per_class` images per class (with CFG), or
    `num_images` unconditional samples. Seed 0 each time, so grids compare across steps."""

    def sample_fn() -> torch.Tensor:
        from diffrt.runtime.loading import torch_pixel_pipeline

        pipe = torch_pixel_pipeline(model, device=next(model.unet.parameters()).device)
        kwargs = dict(num_inference_steps=steps, seed=0, output_type="pt", use_fused_kernel=False)
        if model.info.null_class_label is None:
            return pipe(num_images=num_images, **kwargs).images
        labels = torch.arange(model.info.num_classes).repeat_interleave(per_class)
        return pipe(labels, guidance_scale=guidance_scale, **kwargs).images

    return sample_fn


def check_sample_size(model: PixelModel, name: str, fix: str) -> None:
    """Refuse, before any step, a sample size that the grid's pipeline (diffrt's pixel pipeline, as
    `diffrt generate` and `serve` run it) refuses: the grid after the last step would fail, and with it
    the run, before the model was saved. `name` says where the size came from, `fix` what to do."""
    from diffrt.runtime.loading import torch_pixel_spec

    spec = torch_pixel_spec(model)  # the spec alone: building the pipeline would move the model to the CPU
    size, low, multiple = model.unet.sample_size, spec.ranges["height"][0], spec.multiple_of["height"]
    if size < low or size % multiple:
        raise DiffrtError(f"{name} {size}: diffrt samples this UNet (sample grids, generate, serve) at sides that are "
                          f"multiples of {multiple} from {low} up; {fix}")


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as a shell would take it back: `diffrt train ...` with each argument quoted where it
    needs to be, whether run as `diffrt` or as `python -m diffrt` (whose argv[0] is diffrt/__main__.py); the
    process's own argv, quoted, when the trainer was called from Python."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return ""
    main = Path(__file__).resolve().parents[1] / "__main__.py"
    script = Path(argv[0])
    if script.name in ("diffrt", "diffrt.exe") or (script.name == "__main__.py" and script.resolve() == main):
        return "diffrt " + shlex.join(argv[1:])
    return shlex.join(argv)


def save_trained(model: PixelModel, out: Path, train: TrainConfig, started: float, scheduler_config: dict | None = None,
                 pipeline_class: str = "DDIMPipeline", **made_by) -> None:
    """Save the trained model to out/model, its diffrt.json recording what made it: the command, seed, steps,
    batch size (and the images of a step: micro-batches and processes), the learning rate given and the one the
    schedule peaked at (--scale-lr's product), wall time and torch version, and the trainer's own `made_by`
    fields. A --resume run records `"resumed": true`: its command and wall time are those of the run from the
    checkpoint on."""
    from accelerate import PartialState

    processes = PartialState(cpu=not torch.cuda.is_available()).num_processes  # the loop's: accelerate's one state
    model.info.training = {
        **made_by, "command": command_line(),
        "seed": train.seed, "steps": train.max_steps, "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps, "images_per_step": images_per_step(train, processes),
        "learning_rate": train.learning_rate, "peak_learning_rate": peak_learning_rate(train, processes),
        **({"scale_lr": True} if train.scale_lr else {}),
        "wall_time_s": round(time.time() - started, 1), "torch": torch.__version__, **({"resumed": True} if train.resume else {}),
    }
    model.unet.eval()
    save_pixel_model(model, out / "model", scheduler_config=scheduler_config, pipeline_class=pipeline_class)
    log.info("saved the trained model to %s", out / "model")
