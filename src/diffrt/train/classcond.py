"""`diffrt train class-cond`: a class-conditioned pixel UNet, in either of two ways.

- "class_embedding": a label embedding added to the timestep embedding (diffusers'
  `num_class_embeds`);
- "class_channels": a learned label embedding broadcast over the image and fed as extra
  input channels.

Labels are dropped to the null label with probability `label_dropout`, so one network learns
both p(x | y) and p(x), which classifier-free guidance needs at sampling time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import get_args

from diffrt.data import check_out_outside, load_source
from diffrt.errors import DiffrtError
from diffrt.models import Conditioning, build_pixel_model, small_unet_config
from diffrt.runtime.ddim import BetaSchedule, DDIMConfig, PredictionType
from diffrt.train.checkpoints import holds_out
from diffrt.train.config import TrainConfig, check_out_paths, trainer_defaults, trainer_state
from diffrt.train.loop import TrainResult, seeded_global_rng, train
from diffrt.train.pixel import check_sample_size, grid_guidance_scale, pixel_loss_fn, pixel_sample_fn, save_trained

log = logging.getLogger(__name__)


@dataclass
class ClassCondConfig:
    data: str = "digits"
    conditioning: Conditioning = "class_embedding"
    sample_size: int = 16
    widths: tuple[int, ...] = (32, 64, 64)
    class_embedding_dim: int = 4
    label_dropout: float = 0.1
    num_classes: int | None = None  # checked against the data when given
    crop: str = "center"  # class folders' images: "center" or "random" after resizing the short side
    random_flip: bool = False
    prediction_type: PredictionType = "epsilon"  # the scheduler config the model is saved with says so to every sampler
    beta_schedule: BetaSchedule = "linear"
    sample_steps: int = 25
    sample_guidance_scale: float = 3.0  # the shipped digits model's training_samples.png (weights/digits/README.md)
    train: TrainConfig = field(default_factory=lambda: trainer_defaults("class-cond"))  # the CLI's

    def validate(self) -> None:
        if not 0 <= self.label_dropout < 1:
            raise DiffrtError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")
        if self.crop not in ("center", "random"):
            raise DiffrtError(f"--crop must be 'center' or 'random', got {self.crop!r}")
        if self.prediction_type not in get_args(PredictionType):
            raise DiffrtError(f"--prediction-type must be one of {', '.join(get_args(PredictionType))}, got {self.prediction_type!r}")
        if self.beta_schedule not in get_args(BetaSchedule):
            raise DiffrtError(f"--beta-schedule must be one of {', '.join(get_args(BetaSchedule))}, got {self.beta_schedule!r}")
        if self.sample_size < 1:  # (sizes the sampler refuses are refused once the model is built: check_sample_size)
            raise DiffrtError(f"--resolution must be a positive number of pixels, got {self.sample_size}")
        # small_unet_config has three block types and normalises in groups of 8 channels: other
        # widths fail inside diffusers' UNet2DModel with a ValueError of its own.
        if not 1 <= len(self.widths) <= 3 or any(w < 8 or w % 8 for w in self.widths):
            raise DiffrtError(f"--widths takes 1 to 3 block widths, each a multiple of 8 (the UNet's group norm), "
                              f"got {' '.join(map(str, self.widths))}")
        self.train.validate()
        check_out_paths(self.train.out, folders=("model",))
        check_out_outside(self.train.out, self.data)


@holds_out
def train_class_conditioned(config: ClassCondConfig) -> TrainResult:
    # 1. Data and model, checked before any step runs (the config is, by holds_out).
    dataset = load_source(config.data, config.sample_size, labelled=True, crop=config.crop, random_flip=config.random_flip)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise DiffrtError(f"--num-classes is {config.num_classes} but {config.data} has {dataset.num_classes} class folders; make them match")
    with seeded_global_rng(config.train.seed):  # the initial weights (made on the CPU) follow --seed, so reruns match
        model = build_pixel_model(
            small_unet_config(config.sample_size, dataset.images.shape[1], config.widths),
            conditioning=config.conditioning, num_classes=dataset.num_classes,
            class_embedding_dim=config.class_embedding_dim, class_names=dataset.class_names,
            scheduler=DDIMConfig(prediction_type=config.prediction_type, beta_schedule=config.beta_schedule),
        )
    check_sample_size(model, "--resolution", "pick such a size")
    if config.train.gradient_checkpointing:
        model.unet.unet.enable_gradient_checkpointing()
    unet = model.unet.train().requires_grad_(True)

    # 2. The loss of one micro-batch (a pure function of the step's generator) and the grid:
    #    one row per class, sampled with CFG.
    loss_fn = pixel_loss_fn(model, dataset, config.train.batch_size, config.label_dropout,
                            config.train.snr_gamma, config.train.noise_offset)
    sample_fn = pixel_sample_fn(model, config.sample_steps, grid_guidance_scale(model, config.label_dropout, config.sample_guidance_scale))

    # The checkpoints record the class count of the data too: --resume on a folder with other
    # classes would otherwise only fail on a weight shape; and its image count, below which each
    # step draws its indices (images added or removed would quietly change every later batch).
    state = {"class_cond": {**trainer_state(config), "num_classes": dataset.num_classes, "num_images": len(dataset),
                           "data_content": dataset.content}}
    started = time.time()
    return train(config.train, unet, loss_fn, save_fn=lambda out: save_trained(model, out, config.train, started, trainer="class-cond",
                                                                   label_dropout=config.label_dropout),
                 sample_fn=sample_fn, sample_nrow=8, extra_state=state)


