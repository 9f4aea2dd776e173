"""`diffrt train finetune`: adapt a pretrained pixel-space UNet2DModel to new images.

The model comes from a diffusers folder (a pipeline folder with unet/ + scheduler/, or a bare
UNet2DModel folder) and keeps everything it was trained with: the noise schedule and the
prediction type of its own scheduler config define the DDPM objective here (Ho et al. 2020,
Algorithm 1), and a class-conditioned model keeps its labels (and label dropout, so it stays
usable with classifier-free guidance). Images of any size are resized and cropped to the
model's sample size. The result is a pipeline folder (`out/model`), with the base's scheduler
config as it was and the data's class names, that `UNet2DModel.from_pretrained(out/model,
subfolder="unet")` and `diffrt export` both read.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffrt.data import ImageDataset, check_out_outside, load_source
from diffrt.errors import DataError, DiffrtError
from diffrt.models import UNCONDITIONAL_PIPELINES, PixelModel, load_pixel_model, read_config, scheduler_config_file
from diffrt.train.checkpoints import holds_out
from diffrt.train.config import TrainConfig, check_out_apart, check_out_paths, trainer_defaults, trainer_state
from diffrt.train.loop import TrainResult, train
from diffrt.train.pixel import check_sample_size, grid_guidance_scale, pixel_loss_fn, pixel_sample_fn, save_trained

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    model: str
    data: str = "digits"
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    label_dropout: float = 0.1  # class-conditioned models only
    num_samples: int = 16  # images in each sample grid (per class for a class-conditioned model: 8)
    sample_steps: int = 25
    sample_guidance_scale: float = 3.0
    train: TrainConfig = field(default_factory=lambda: trainer_defaults("finetune"))  # the CLI's

    def validate(self) -> None:
        if self.crop not in ("center", "random"):
            raise DiffrtError(f"--crop must be 'center' or 'random', got {self.crop!r}")
        if not 0 <= self.label_dropout < 1:
            raise DiffrtError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")
        if self.num_samples < 1 or self.sample_steps < 1:
            raise DiffrtError(f"need num_samples >= 1 and sample_steps >= 1, got {self.num_samples} and {self.sample_steps}")
        self.train.validate()
        check_out_paths(self.train.out, folders=("model",))
        check_out_apart(self.train.out, self.model, "model")
        check_out_outside(self.train.out, self.data)


@holds_out
def finetune(config: FinetuneConfig) -> TrainResult:
    # 1. Model and data, checked before any step runs (the config is, by holds_out).
    pipeline_class = _require_unet2d(Path(config.model))
    model = load_pixel_model(config.model)
    _require_square(model, config.model)
    # The base's scheduler config, saved with the result as it is (load_pixel_model keeps the part
    # that DDIM sampling and the objective read; the rest, such as a DDPMScheduler's variance_type,
    # and the scheduler class are the base's too).
    scheduler_file = scheduler_config_file(Path(config.model))
    scheduler_config = read_config(scheduler_file) if scheduler_file else None
    if scheduler_file is None:  # the objective is the scheduler's: a v-prediction UNet would learn the wrong target
        log.warning("%s has no scheduler config (scheduler/scheduler_config.json, or scheduler_config.json beside the UNet): "
                    "fine-tuning with diffusers' defaults, %d steps of %s betas predicting %s; a model trained otherwise "
                    "would be ruined: put its scheduler config beside it", config.model, model.scheduler.num_train_timesteps,
                    model.scheduler.beta_schedule, model.scheduler.prediction_type)
    check_sample_size(model, f"{config.model} has sample_size", "fine-tune a model made for such a size")
    dataset = _load_data(config, model)
    if config.train.gradient_checkpointing:
        model.unet.unet.enable_gradient_checkpointing()
    unet = model.unet.train().requires_grad_(True)
    log.info("fine-tuning %s on %d images of %s (%s, prediction_type=%s)", config.model, len(dataset), config.data,
             model.info.conditioning, model.scheduler.prediction_type)

    # 2. The loss of one micro-batch (a pure function of the step's generator) and the sample
    #    grid (one row per class for a class-conditioned model).
    loss_fn = pixel_loss_fn(model, dataset, config.train.batch_size, config.label_dropout,
                            config.train.snr_gamma, config.train.noise_offset)
    sample_fn = pixel_sample_fn(model, config.sample_steps, grid_guidance_scale(model, config.label_dropout, config.sample_guidance_scale),
                                num_images=config.num_samples)

    # The checkpoints record the image count too (the state holds --data's name, not its files): each step
    # draws indices below it, so --resume on a folder with images added or removed would quietly draw
    # other batches than the run it continues.
    started = time.time()
    made_by = dict(trainer="finetune", base_model=str(config.model), data=config.data,
                   **({"label_dropout": config.label_dropout} if model.info.null_class_label is not None else {}))
    return train(config.train, unet, loss_fn, save_fn=lambda out: save_trained(model, out, config.train, started, scheduler_config,
                                                                               pipeline_class, **made_by),
                 sample_fn=sample_fn, sample_nrow=8, extra_state={"finetune": {**trainer_state(config), "num_images": len(dataset),
                                                                      "data_content": dataset.content}})


def _require_unet2d(folder: Path) -> str:
    """A latent pipeline folder also has a UNet2DModel in unet/; say so instead of training it on pixels (another
    UNet class, a text-to-image pipeline's, load_pixel_model refuses). Returns the pipeline class the result's
    model_index.json names: the base's (DDPMPipeline stays one), else DDIMPipeline."""
    # A latent pipeline's UNet2DModel (LDMPipeline: vqvae/ + unet/) denoises the autoencoder's latents,
    # not images: trained on pixels here, it would be silently ruined and saved without its autoencoder.
    try:
        components = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return "DDIMPipeline"
    if not isinstance(components, dict):
        return "DDIMPipeline"
    latent = [name for name in ("vqvae", "vae") if components.get(name)]
    if latent:
        raise DiffrtError(f"{folder} is a latent pipeline ({components.get('_class_name')}, with {latent[0]}/): its UNet "
                          "denoises latents, not images; `diffrt train finetune` fine-tunes pixel-space UNet2DModels")
    kind = components.get("_class_name")
    return kind if kind in UNCONDITIONAL_PIPELINES else "DDIMPipeline"


def _require_square(model: PixelModel, folder: str) -> None:
    """diffrt trains on square crops and samples at one side: a UNet made for another shape would be trained on
    squares of its first side without a word."""
    size = model.unet.unet.config.sample_size
    if not isinstance(size, int) and len(set(size)) > 1:
        raise DiffrtError(f"{folder}: the UNet's sample_size is {tuple(size)}, not square; diffrt fine-tunes on square crops "
                          "of one side: set sample_size in its unet/config.json to the side to train at")


def _load_data(config: FinetuneConfig, model: PixelModel) -> ImageDataset:
    """The images at the model's sample size and channel count (and its labels, if it has classes)."""
    info = model.info
    labelled = info.conditioning != "none"
    dataset = load_source(config.data, model.unet.sample_size, labelled=labelled, crop=config.crop,
                          random_flip=config.random_flip, model_names=info.class_names)
    if labelled and dataset.num_classes != info.num_classes:
        raise DataError(f"{config.model} is conditioned on {info.num_classes} classes but {config.data} has "
                        f"{dataset.num_classes} ({', '.join(dataset.class_names)}); give one folder per class of the model")
    if labelled and dataset.class_names != info.class_names:
        # Other names than the model's (folders named alike keep the model's label order): label i is now the
        # data's class i, and the saved model names those.
        if info.class_names:
            log.warning("%s names its classes %s; label i is now class folder i of %s: %s", config.model,
                        ", ".join(info.class_names), config.data, ", ".join(dataset.class_names))
        info.class_names = list(dataset.class_names)
    channels = model.unet.out_channels
    if channels == 1:
        dataset = dataset.to_grey()
    elif channels != 3:
        raise DataError(f"{config.model} has {channels} image channels; fine-tuning on images supports 1 (grey) or 3 (RGB)")
    return dataset


